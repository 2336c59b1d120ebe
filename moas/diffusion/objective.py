"""The diffusion objective: noising, the prediction target, the Min-SNR-weighted loss and x0.

One owner for training and validation, and for any diffusion model that takes ``(x_t, t, cond)`` and
returns a :class:`~moas.models.generator.Prediction` (the prediction and its auxiliary loss): the base
text-to-image generator today; a super-resolution stage that also reads an upsampled low-resolution image
from ``cond`` fits the same contract, so it trains through the same step.

Notation (Salimans & Ho 2022): x_t = α_t x0 + σ_t ε; the network predicts v = α_t ε − σ_t x0 (or ε).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moas.diffusion.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor | float]]


@dataclass
class ObjectiveOutput:
    """One batch through the objective."""

    loss: torch.Tensor  # () Min-SNR-weighted mean over the batch
    weighted: torch.Tensor  # (B,) Min-SNR-weighted error per image
    per_sample: torch.Tensor  # (B,) unweighted mean squared error per image
    aux: torch.Tensor | float  # the network's auxiliary loss (load balance, compression); 0 if none
    x_t: torch.Tensor  # (B, C, H, W) the noised input
    pred: torch.Tensor  # (B, C, H, W) the network's prediction (its own dtype)
    t: torch.Tensor  # (B,)

    def x0(self, schedule: NoiseSchedule) -> torch.Tensor:
        """The predicted clean image, float32 (B, C, H, W)."""
        return schedule.predict_x0(self.x_t.float(), self.pred.float(), self.t)


class DiffusionObjective:
    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def __call__(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        cond: dict,
        t: torch.Tensor,
        noise: torch.Tensor,
        autocast: Callable[[], object] | None = None,
    ) -> ObjectiveOutput:
        """Noise ``x0`` to step ``t`` with ``noise``, predict, and score the prediction against the target.

        ``autocast`` (a context factory) wraps only the network's forward; the loss is computed in float32.
        """
        s = self.schedule
        x_t = s.add_noise(x0, noise, t)
        if autocast is None:
            pred, aux = model(x_t, t, cond)
        else:
            with autocast():
                pred, aux = model(x_t, t, cond)
        per_sample = F.mse_loss(pred.float(), s.target(x0, noise, t), reduction="none").mean(
            (1, 2, 3)
        )  # (B,)
        weighted = per_sample * s.loss_weight(t)  # (B,)
        return ObjectiveOutput(weighted.mean(), weighted, per_sample, aux, x_t, pred, t)
