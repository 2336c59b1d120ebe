"""GAN loss: binary cross-entropy with the original's label smoothing (real 0.9, fake 0.1)."""

from __future__ import annotations

import torch

REAL_LABEL = 0.9
FAKE_LABEL = 0.1


def _bce(prob: torch.Tensor, label: float) -> torch.Tensor:
    # BCE on probabilities is unsafe under autocast, so it runs in float32 with the ends clamped.
    # Written out rather than F.binary_cross_entropy so a NaN input yields NaN for the guard, not an error.
    p = prob.float().clamp(1e-6, 1 - 1e-6).flatten(1).mean(1)  # (B,)
    return -(label * torch.log(p) + (1 - label) * torch.log1p(-p))


def discriminator_loss(real_prob: torch.Tensor, fake_prob: torch.Tensor) -> torch.Tensor:
    """Scalar D loss: real images toward 0.9, generated ones toward 0.1."""
    return _bce(real_prob, REAL_LABEL).mean() + _bce(fake_prob, FAKE_LABEL).mean()


def generator_gan_loss(fake_prob: torch.Tensor) -> torch.Tensor:
    """Per-sample G loss: generated images toward the (smoothed) real label."""
    return _bce(fake_prob, REAL_LABEL)
