"""Speed switches of the generator's U-Net: channels_last memory format, gradient checkpointing, torch.compile.

They change how the U-Net computes, not what: channels_last and checkpointing match the default path to
float rounding (``tests/test_speed_switches.py``), so the CPU defaults (all off) keep the pinned numbers.

* ``channels_last`` — ``auto``: on for CUDA (cuDNN's convolutions are fastest in NHWC on tensor cores), off
  elsewhere (on the CPU the formats trade places by layer and the pinned numbers are NCHW's);
* ``gradient_checkpointing`` — ``auto``: off unless a memory planner asks for it (``planned``), since it
  costs about a third more compute for the activations it saves;
* ``compile`` — ``torch.compile`` of the U-Net's forward. Compilation is lazy, so it can fail at the first
  call as well as at once; either way the U-Net runs uncompiled from then on, after one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moas.models.generator import MoasGenerator
from moas.train.oom import first_line, is_oom

log = logging.getLogger("moas.train.loop")


def resolve_switch(setting: bool | str, auto: bool) -> bool:
    """A ``true | false | "auto"`` config value, with ``auto`` standing for ``auto``."""
    return auto if setting == "auto" else bool(setting)


def speed_up_unet(
    model: MoasGenerator,
    ema_model: MoasGenerator,
    device: torch.device,
    channels_last: bool | str,
    gradient_checkpointing: bool | str,
    compile_: bool,
    planned_checkpointing: bool = False,
) -> None:
    """Apply the switches to the trained model's U-Net; its EMA copy (what generation samples) gets the
    same memory format, so the averaging runs over tensors of equal strides, and stays uncompiled."""
    cl = resolve_switch(channels_last, device.type == "cuda")
    gc = resolve_switch(gradient_checkpointing, planned_checkpointing)
    if cl:
        model.unet.use_channels_last()
        ema_model.unet.use_channels_last()
    if gc:
        model.unet.use_gradient_checkpointing()
    compiled = compile_ and compile_forward(model.unet.unet)
    switches = {"channels_last": cl, "gradient checkpointing": gc, "torch.compile": compiled}
    on = [name for name, v in switches.items() if v]
    if on:
        log.info("U-Net: %s.", ", ".join(on))


def compile_forward(module: nn.Module, compiler: Callable[..., Any] | None = None) -> bool:
    """Replace ``module.forward`` by its compiled version, falling back to eager for good, with one
    warning, if compiling raises now or at the first call. True when the compiled forward is installed.

    ``compiler``: ``torch.compile`` (looked up at call time, so tests can replace it)."""
    eager = module.forward
    try:
        compiled = (compiler or torch.compile)(eager)
    except Exception as exc:
        log.warning("torch.compile failed (%s); the U-Net runs uncompiled.", first_line(exc))
        return False

    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:
            if is_oom(exc):  # a real shortage, for the loop's recovery
                raise
            log.warning("torch.compile failed (%s); the U-Net runs uncompiled.", first_line(exc))
        module.forward = eager
        return eager(*args, **kwargs)

    module.forward = forward
    return True
