"""Speed switches of the generator's U-Net: channels_last memory format, gradient checkpointing, torch.compile.

They change how the U-Net computes, not what: channels_last and checkpointing match the default path to
float rounding (``tests/test_speed_switches.py``), so the CPU defaults (all off) keep the pinned numbers.

* ``channels_last`` — ``auto``: off everywhere until a GPU measurement says otherwise. cuDNN's convolutions
  prefer NHWC on tensor cores, but the CUDA GroupNorm kernel works in NCHW and the attention blocks call
  ``.contiguous()``, so every block would convert back and forth; on the CPU the formats trade places by
  layer and the pinned numbers are NCHW's. ``true`` turns it on;
* ``gradient_checkpointing`` — ``auto``: off unless a memory planner asks for it (``planned``), since it
  costs about a third more compute for the activations it saves;
* ``compile`` — ``torch.compile`` of the U-Net's forward. Compilation is lazy, so it can fail at once, at
  the first call, or later in a backward pass or a recompilation; each way the U-Net runs uncompiled from
  then on, after one warning (a failure inside a step makes the loop redo that step uncompiled).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moas.models.generator import MoasGenerator
from moas.train.faults import first_line, is_oom

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
) -> CompiledForward | None:
    """Apply the switches to the trained model's U-Net; its EMA copy (what generation samples) gets the
    same memory format, so the averaging runs over tensors of equal strides, and stays uncompiled. Returns
    the compiled forward, if any, for the loop to fall back from."""
    cl = resolve_switch(channels_last, False)  # unmeasured on a GPU: see the module docstring
    gc = resolve_switch(gradient_checkpointing, planned_checkpointing)
    if cl:
        model.unet.use_channels_last()
        ema_model.unet.use_channels_last()
    if gc:
        model.unet.use_gradient_checkpointing()
    compiled = compile_forward(model.unet.unet) if compile_ else None
    switches = {"channels_last": cl, "gradient checkpointing": gc, "torch.compile": compiled is not None}
    on = [name for name, v in switches.items() if v]
    if on:
        log.info("U-Net: %s.", ", ".join(on))
    return compiled


# Where torch.compile's own code lives: an error raised from a frame in one of these is the compiler's.
COMPILER_PATHS = tuple(
    os.sep + os.path.join("torch", name) + os.sep for name in ("_dynamo", "_inductor", "_functorch")
)


class CompiledForward:
    """``module.forward`` replaced by its compiled version, with the way back to eager.

    Compilation is lazy: it can fail at the first call (caught here) or later, in a backward pass or at a
    recompilation for a new input shape, where the training loop catches it; :meth:`caused` tells such an
    error from others, :meth:`fall_back` restores the eager forward for good."""

    def __init__(self, module: nn.Module, eager: Callable[..., Any], compiled: Callable[..., Any]) -> None:
        self.module, self.eager, self.compiled = module, eager, compiled
        self.active = True

        def forward(*args: Any, **kwargs: Any) -> Any:
            try:
                return compiled(*args, **kwargs)
            except Exception as exc:
                if is_oom(exc):  # a real shortage, for the loop's recovery
                    raise
                self.fall_back(exc)
            return eager(*args, **kwargs)

        module.forward = forward

    def fall_back(self, exc: BaseException) -> None:
        log.warning("torch.compile failed (%s); the U-Net runs uncompiled.", first_line(exc))
        self.module.forward = self.eager
        self.active = False

    def caused(self, exc: BaseException) -> bool:
        """Whether ``exc`` came from the compiled code (not an out-of-memory error, which is recovered as such)."""
        if not self.active or is_oom(exc):
            return False
        tb = exc.__traceback__
        while tb is not None:
            if any(p in tb.tb_frame.f_code.co_filename for p in COMPILER_PATHS):
                return True
            tb = tb.tb_next
        return False


def compile_forward(module: nn.Module, compiler: Callable[..., Any] | None = None) -> CompiledForward | None:
    """Replace ``module.forward`` by its compiled version (None, with one warning, if compiling raises now).

    ``compiler``: ``torch.compile`` (looked up at call time, so tests can replace it)."""
    eager = module.forward
    try:
        compiled = (compiler or torch.compile)(eager)
    except Exception as exc:
        log.warning("torch.compile failed (%s); the U-Net runs uncompiled.", first_line(exc))
        return None
    return CompiledForward(module, eager, compiled)
