"""Noise schedule, training targets and Min-SNR-γ loss weights.

The schedule is a diffusers ``DDPMScheduler`` (its ``alphas_cumprod`` define q(x_t | x_0)); this module
adds the pieces a training step needs. Notation follows the v-prediction paper (Salimans & Ho 2022):
x_t = α_t x_0 + σ_t ε with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t); v = α_t ε - σ_t x_0; SNR = α_t² / σ_t².
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from moas.config import DiffusionConfig


def make_train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=True,
        clip_sample_range=1.0,
    )


class NoiseSchedule:
    """Pure-tensor view of the schedule used by the training step (no scheduler state)."""

    def __init__(self, scheduler: DDPMScheduler, prediction_type: str, min_snr_gamma: float) -> None:
        abar = scheduler.alphas_cumprod.to(torch.float64)
        self.alpha = abar.sqrt().float()  # (T,)
        self.sigma = (1 - abar).sqrt().float()  # (T,)
        self.snr = (abar / (1 - abar)).float()  # (T,)
        self.num_timesteps = len(abar)
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma

    def _on(self, device: torch.device) -> None:
        """Keep the tables where the timesteps are: moved once, not copied to the GPU at every lookup."""
        if self.alpha.device != device:
            self.alpha, self.sigma, self.snr = (x.to(device) for x in (self.alpha, self.sigma, self.snr))

    def _at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        self._on(t.device)
        return getattr(self, name)[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._at("alpha", t) * x0 + self._at("sigma", t) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self._at("alpha", t) * noise - self._at("sigma", t) * x0  # v

    def predict_x0(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._at("alpha", t), self._at("sigma", t)
        if self.prediction_type == "epsilon":
            return (x_t - s * pred) / a
        return a * x_t - s * pred

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weights (Hang et al. 2023, eq. 9), expressed for the chosen prediction target.

        For ε-prediction w = min(SNR, γ) / SNR; for v-prediction w = min(SNR, γ) / (SNR + 1), which is
        the same weighting of the underlying x0 error. γ = 0 disables weighting (w = 1).
        """
        if self.min_snr_gamma <= 0:
            return torch.ones(t.shape, device=t.device)
        self._on(t.device)
        snr = self.snr[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr
