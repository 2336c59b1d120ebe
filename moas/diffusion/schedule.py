"""Noise schedule, training targets and Min-SNR-γ loss weights.

The schedule is a diffusers ``DDPMScheduler`` (its ``alphas_cumprod`` define q(x_t | x_0)); this module
adds the pieces a training step needs. Notation follows the v-prediction paper (Salimans & Ho 2022):
x_t = α_t x_0 + σ_t ε with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 - ᾱ_t); v = α_t ε - σ_t x_0; SNR = α_t² / σ_t².
The network may predict v, ε or x_0 itself (``sample``: x-prediction).

A resolution shift (Hoogeboom et al. 2023, "simple diffusion") divides the SNR of every step by shift²:
a larger image keeps more of its low frequencies at the same per-pixel noise, so it needs more noise to
be destroyed as thoroughly as a small one.
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


def shifted_betas(alphas_cumprod: torch.Tensor, shift: float) -> list[float]:
    """Betas of the schedule whose SNR at every step is the given one's divided by ``shift``²."""
    abar = alphas_cumprod.to(torch.float64)
    snr = abar / (1 - abar) / shift**2
    shifted = snr / (1 + snr)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), shifted[:-1]])
    return (1 - shifted / prev).clamp(0, 0.999).tolist()


def make_scheduler(
    prediction_type: str, beta_schedule: str = "squaredcos_cap_v2", shift: float = 1.0, steps: int = 1000
) -> DDPMScheduler:
    """A training scheduler for any prediction type, with the SNR of ``beta_schedule`` shifted by ``shift``."""
    base = DDPMScheduler(num_train_timesteps=steps, beta_schedule=beta_schedule)
    trained = None if shift == 1.0 else shifted_betas(base.alphas_cumprod, shift)
    return DDPMScheduler(
        num_train_timesteps=steps,
        beta_schedule=beta_schedule,
        trained_betas=trained,
        prediction_type=prediction_type,
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
        if self.prediction_type == "sample":
            return x0
        return self._at("alpha", t) * noise - self._at("sigma", t) * x0  # v

    def predict_x0(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._at("alpha", t), self._at("sigma", t)
        if self.prediction_type == "epsilon":
            return (x_t - s * pred) / a
        if self.prediction_type == "sample":
            return pred
        return a * x_t - s * pred

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weights (Hang et al. 2023, eq. 9), expressed for the chosen prediction target.

        For ε-prediction w = min(SNR, γ) / SNR; for v-prediction w = min(SNR, γ) / (SNR + 1); for
        x-prediction w = min(SNR, γ): the same weighting of the underlying x0 error in all three, so they
        differ only in what the network outputs. γ = 0 disables weighting (w = 1).
        """
        if self.min_snr_gamma <= 0:
            return torch.ones(t.shape, device=t.device)
        self._on(t.device)
        snr = self.snr[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "sample":
            return clipped
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr
