"""QualityEnhancer: the trained post-processing cascade (super-resolution, detail, colour, multi-scale).

Modes (the original's four, plus ``none``):
  ``resolution``  SuperResolutionSystem only (bicubic + learned residual);
  ``detail``      SR, then AdvancedDetailEnhancer;
  ``color``       SR, then ColorVibrancySystem;
  ``full``        SR, then MultiScaleProcessor → AdvancedDetailEnhancer and ColorVibrancySystem → the base
                  enhancer, blended with the original's weights: enhanced + 0.3·details + 0.2·vibrant. moas
                  applies the 0.3 / 0.2 to the *changes* the detail and colour stages make, so the blend
                  of three unchanged images is the image itself (an untrained enhancer is an exact identity);
  ``none``        plain bicubic resizing.
Staged enhancement: the stages after SR run on a copy downscaled to ``max_side`` (320–896 px, chosen from
free memory), and only their change is upscaled back and added, so large outputs cost bounded memory and
an untrained enhancer stays an identity at any size.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moas.models.enhance_parts import (
    AdvancedDetailEnhancer,
    ColorVibrancySystem,
    MultiScaleProcessor,
    conv_stack,
    zero_last,
)
from moas.models.enhance_sr import SuperResolutionSystem, bicubic

log = logging.getLogger(__name__)

MODES = ("full", "resolution", "detail", "color", "none")
MIN_SIDE, MAX_SIDE = 320, 896  # the original's staged-enhancement range


def staged_max_side(device: torch.device | None = None) -> int:
    """Largest side processed in one piece: 320 px with ≤ 1 GB free, 896 px with ≥ 8 GB, linear between.

    Free VRAM on CUDA, free RAM (psutil) on the CPU; rounded down to a multiple of 32.
    """
    free_gb = 0.0
    try:
        if device is not None and device.type == "cuda":
            free_gb = torch.cuda.mem_get_info(device)[0] / 2**30
        else:
            import psutil

            free_gb = psutil.virtual_memory().available / 2**30
    except Exception:  # no measurement: the safe small size
        free_gb = 0.0
    frac = min(max((free_gb - 1.0) / 7.0, 0.0), 1.0)
    return int(MIN_SIDE + frac * (MAX_SIDE - MIN_SIDE)) // 32 * 32


class QualityEnhancer(nn.Module):
    def __init__(self, width: int = 128, sr_channels: int = 64, sr_blocks: int = 8) -> None:
        super().__init__()
        self.init_args = {"width": width, "sr_channels": sr_channels, "sr_blocks": sr_blocks}
        self.super_resolution = SuperResolutionSystem(sr_channels, sr_blocks)
        self.multi_scale = MultiScaleProcessor(width)
        self.detail = AdvancedDetailEnhancer(width)
        self.color = ColorVibrancySystem(width)
        self.base_enhancer = zero_last(conv_stack([3, width, width, 3]))

    def upscale(self, x: torch.Tensor, size: tuple[int, int], mode: str = "full") -> torch.Tensor:
        """(B, 3, h, w) → (B, 3, H, W): SR ×2 up to 2× larger, ×4 beyond (then resized), bicubic otherwise."""
        h, w = x.shape[-2:]
        ratio = max(size[0] / h, size[1] / w)
        if mode == "none" or ratio <= 1.0:
            return bicubic(x, size)
        scale = 2 if ratio <= 2.0 else 4
        if ratio <= scale:
            return self.super_resolution(x, scale, size)
        return bicubic(self.super_resolution(x, scale), size)  # beyond ×4: bicubic for the remainder

    def refine(self, x: torch.Tensor, mode: str = "full") -> torch.Tensor:
        """The same-size stages of ``mode`` on (B, 3, H, W) in [-1, 1]."""
        if mode in ("none", "resolution"):
            return x
        if mode == "detail":
            return self.detail(x)
        if mode == "color":
            return self.color(x)
        ms = self.multi_scale(x)
        details, vibrant = self.detail(ms), self.color(ms)
        enhanced = ms + self.base_enhancer(ms)
        return enhanced + 0.3 * (details - ms) + 0.2 * (vibrant - ms)

    def forward(
        self, x: torch.Tensor, size: tuple[int, int] | None = None, mode: str = "full"
    ) -> torch.Tensor:
        """Upscale to ``size`` (default: unchanged) and refine; the training path (no staging)."""
        if mode not in MODES:
            raise ValueError(f"unknown enhance mode {mode!r}; use one of {', '.join(MODES)}")
        y = self.upscale(x, size or tuple(x.shape[-2:]), mode)
        return self.refine(y, mode)

    @torch.no_grad()
    def enhance(
        self,
        x: torch.Tensor,
        size: tuple[int, int] | None = None,
        mode: str = "full",
        max_side: int | None = None,
    ) -> torch.Tensor:
        """Inference with staged refinement: refine a copy of at most ``max_side`` px, add back its change."""
        if mode not in MODES:
            raise ValueError(f"unknown enhance mode {mode!r}; use one of {', '.join(MODES)}")
        y = self.upscale(x, size or tuple(x.shape[-2:]), mode)
        if mode in ("none", "resolution"):
            return y.clamp(-1, 1)
        max_side = max_side or staged_max_side(x.device)
        h, w = y.shape[-2:]
        if max(h, w) <= max_side:
            return self.refine(y, mode).clamp(-1, 1)
        k = max_side / max(h, w)
        small = bicubic(y, (max(8, round(h * k)), max(8, round(w * k))))
        change = self.refine(small, mode) - small  # (B, 3, h', w')
        log.debug("Staged enhancement: %dx%d processed at %dx%d.", w, h, small.shape[-1], small.shape[-2])
        return (y + bicubic(change, (h, w))).clamp(-1, 1)
