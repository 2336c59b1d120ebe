"""Mixed precision: the autocast context of the networks' forward passes and their GradScalers.

Autocast (bf16 or fp16, ``moas.device.autocast_dtype``) wraps only the forward passes; losses are computed in
float32. Under fp16 every backward goes through a GradScaler, and there is one per optimizer — the
generator's, the discriminator's and the enhancer's — because their gradients live on different scales: an
overflow in one network then lowers only its own loss scale and skips only its own step. Under bf16 and
fp32 the scalers are disabled and pass losses, gradients and steps through unchanged. A scaler lives on the
run's device (``GradScaler("cpu")`` runs the fp16 path, overflow handling included, without a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import torch

AutocastFactory = Callable[[], AbstractContextManager]


def autocast_factory(device: torch.device, dtype: torch.dtype | None) -> AutocastFactory | None:
    """A factory of autocast contexts for ``device`` in ``dtype``; None for fp32."""
    if dtype is None:
        return None
    return partial(torch.autocast, device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler on ``device``, enabled only for fp16 (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any] | None) -> None:
    """Restore a saved scaler state. A checkpoint of an fp32/bf16 run (an empty state) or of an older
    release (no state) leaves a fresh scaler: its scale calibrates itself within a few steps."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


def scaled_step(
    scaler: torch.amp.GradScaler,
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    max_norm: float,
) -> torch.Tensor:
    """Unscale, clip to ``max_norm`` and step — skipped by the scaler when a gradient overflowed, which
    also lowers the scale; returns the gradient norm before clipping."""
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(opt)
    scaler.update()
    return norm
