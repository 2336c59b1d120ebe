"""From the base image to the output size: which upscaler, the default output size, and the stages record.

Three upscalers (``moas generate --upscaler``):
  ``diffusion``  the cascade's super-resolution diffusion stage (``moas.inference.sr_upscale``): ``sr.scale``×
                 the base, then resized with bicubic filtering to the requested size if that differs;
  ``enhancer``   the feed-forward QualityEnhancer (fast; sharpens, cannot invent detail);
  ``bicubic``    plain resizing, the baseline.
The default is the best the model file has, in that order. Without ``--width/--height`` a model with a
super-resolution stage is drawn at the cascade's size (base × ``sr.scale``) whatever the upscaler, so the
three give images of the same size to compare.
"""

from __future__ import annotations

import logging

import torch

from moas.data.dataset import to_model_range, to_uint8
from moas.errors import MoasError
from moas.inference.aspect import centre_crop, cover_size
from moas.inference.pipeline import Pipeline
from moas.models.enhance import QualityEnhancer

log = logging.getLogger(__name__)

UPSCALERS = ("diffusion", "enhancer", "bicubic")


def choose_upscaler(pipe: Pipeline, requested: str | None) -> str:
    """The upscaler to use: ``requested`` when the model has it, else the best the model has."""
    if requested is None:
        return "diffusion" if pipe.sr is not None else "enhancer" if pipe.enhancer is not None else "bicubic"
    if requested not in UPSCALERS:
        raise MoasError(f"--upscaler must be one of {', '.join(UPSCALERS)}, got {requested!r}.")
    if requested == "diffusion" and pipe.sr is None:
        raise MoasError(
            "This model has no super-resolution stage (train with sr.train = true, or add one with "
            "'moas train --stage sr'); use --upscaler enhancer or bicubic."
        )
    if requested == "enhancer" and pipe.enhancer is None:
        raise MoasError("This model has no trained enhancer; use --upscaler diffusion or bicubic.")
    return requested


def output_side(pipe: Pipeline) -> int:
    """The default output side: the cascade's when the model has a super-resolution stage, else the base."""
    return pipe.resolution * (pipe.sr.scale if pipe.sr is not None else 1)


def resize_to(images: torch.Tensor, width: int | None, height: int | None) -> torch.Tensor:
    """uint8 images resized to ``width × height`` with bicubic filtering (no aspect handling)."""
    h, w = images.shape[-2:]
    width, height = width or w, height or h
    if (width, height) == (w, h):
        return images
    x = torch.nn.functional.interpolate(
        images.float(), size=(height, width), mode="bicubic", align_corners=False
    )
    return x.round().clamp(0, 255).to(torch.uint8)


def cascade(
    images: torch.Tensor,
    enhancer: QualityEnhancer | None,
    width: int | None,
    height: int | None,
    mode: str = "full",
    max_side: int | None = None,
) -> torch.Tensor:
    """Base-resolution uint8 (B, 3, h, w) → (B, 3, height, width) through the trained SR + enhancement stages.

    The images are brought up with their aspect kept to the smallest size that covers ``width × height``
    and centre-cropped to it (:mod:`moas.inference.aspect`), so nothing is stretched. Without a trained
    enhancer (an older model file) or with mode ``none`` the upscaling is plain bicubic resizing.
    """
    h, w = images.shape[-2:]
    width, height = width or w, height or h
    cw, ch = cover_size((w, h), (width, height))
    if enhancer is None or mode == "none":
        if mode != "none":
            log.info("This model file has no trained enhancer; resizing with bicubic filtering.")
        return centre_crop(resize_to(images, cw, ch), width, height)
    dev = next(enhancer.parameters()).device
    x = to_model_range(images).to(dev)  # (B, 3, h, w) in [-1, 1]
    out = [enhancer.enhance(xi[None], (ch, cw), mode, max_side) for xi in x]
    return centre_crop(to_uint8(torch.cat(out, 0)).cpu(), width, height)


def upscale(
    pipe: Pipeline,
    images: torch.Tensor,
    upscaler: str,
    size: tuple[int, int],
    prompts: list[str],
    seeds: list[int],
    enhance_mode: str,
    progress: bool = False,
) -> tuple[torch.Tensor, str]:
    """Base images uint8 (B, 3, h, w) -> (B, 3, height, width) for ``size`` = (width, height); and the
    stages' description for the PNG parameters."""
    width, height = size
    h, w = images.shape[-2:]
    if upscaler == "diffusion":
        text = pipe.encode(prompts)
        out = pipe.sr(images, text, seeds, progress=progress)  # (B, 3, s·h, s·w)
        stages = f"base {w}x{h}, {pipe.sr.describe()}"
        if tuple(out.shape[-2:]) != (height, width):
            stages += f", bicubic to {width}x{height}"
        return cascade(out, None, width, height, "none"), stages
    if (width, height) == (w, h):
        return images, f"base {w}x{h}"
    if upscaler == "enhancer":
        out = cascade(images, pipe.enhancer, width, height, enhance_mode)
        return out, f"base {w}x{h}, enhancer {enhance_mode}"
    return cascade(images, None, width, height, "none"), f"base {w}x{h}, bicubic"
