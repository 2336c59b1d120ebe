"""``moas generate``: prompt → PNG files with the generation parameters embedded (A1111-style)."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from moas.data.dataset import to_model_range, to_uint8
from moas.errors import MoasError
from moas.models.enhance import MODES, QualityEnhancer
from moas.pipeline import Pipeline
from moas.train.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

SAMPLER_LABELS = {"dpmsolver++": "DPM++ 2M", "ddim": "DDIM", "ddpm": "DDPM", "euler_a": "Euler a"}


@dataclass
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 0
    sampler: str = "dpmsolver++"
    width: int | None = None
    height: int | None = None
    style: str | None = None  # artist style from the model's style database (--style)
    quality_enhance: str | None = None  # full | resolution | detail | color | none; None: the model's default


def validate_request(req: GenerateRequest) -> None:
    if not req.prompt or not req.prompt.strip():
        raise MoasError(
            'The prompt is empty; describe the image, e.g. --prompt "1girl, red hair, blue eyes, forest".'
        )
    if req.num_images < 1:
        raise MoasError("--num_images must be at least 1.")
    if req.steps < 1 or req.steps > 1000:
        raise MoasError("--steps must be between 1 and 1000.")
    if req.quality_enhance is not None and req.quality_enhance not in MODES:
        raise MoasError(f"--quality_enhance must be one of {', '.join(MODES)}.")
    for name, v in (("--width", req.width), ("--height", req.height)):
        if v is not None and not 8 <= v <= 4096:
            raise MoasError(f"{name} must be between 8 and 4096 pixels.")


def parameters_text(
    req: GenerateRequest, seed: int, size: tuple[int, int], model_hash: str, model_name: str
) -> str:
    """The A1111 ``parameters`` chunk: prompt, negative prompt, then one line of key: value pairs."""
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    lines.append(
        f"Steps: {req.steps}, Sampler: {SAMPLER_LABELS.get(req.sampler, req.sampler)}, CFG scale: {req.guidance_scale:g}, "
        f"Seed: {seed}, Size: {size[0]}x{size[1]}, Model hash: {model_hash}, Model: {model_name}, "
        + (f"Style: {req.style}, " if req.style else "")
        + f"Quality enhance: {req.quality_enhance or 'default'}, "
        + "Version: moas"
    )
    return "\n".join(lines)


def output_paths(output: str | Path, n: int) -> list[Path]:
    """``result.png`` for one image; ``result_000.png``, ``result_001.png``… for several."""
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise MoasError(f"--output must be a .png file name, got {out.name}.")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:03d}.png") for i in range(n)]


def save_png(image: torch.Tensor, path: Path, parameters: str) -> None:
    """Write a uint8 (3, H, W) image atomically with its ``parameters`` text chunk."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    info = PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", pnginfo=info)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def resize_to(images: torch.Tensor, width: int | None, height: int | None) -> torch.Tensor:
    """Bring base-resolution images to the requested size (bicubic until the trained SR stage is in)."""
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

    Without a trained enhancer (an older model file) or with mode ``none`` this is plain bicubic resizing.
    """
    if enhancer is None or mode == "none":
        if mode != "none":
            log.info("This model file has no trained enhancer; resizing with bicubic filtering.")
        return resize_to(images, width, height)
    h, w = images.shape[-2:]
    dev = next(enhancer.parameters()).device
    x = to_model_range(images).to(dev)  # (B, 3, h, w) in [-1, 1]
    out = [enhancer.enhance(xi[None], (height or h, width or w), mode, max_side) for xi in x]
    return to_uint8(torch.cat(out, 0)).cpu()


def generate(
    pipe: Pipeline, req: GenerateRequest, output: str | Path, model_name: str, progress: bool = True
) -> list[Path]:
    validate_request(req)
    paths = output_paths(output, req.num_images)
    seeds = [req.seed + i for i in range(req.num_images)]
    pipe.set_style(req.style)
    images = pipe(
        [req.prompt] * req.num_images,
        seeds=seeds,
        negative_prompt=req.negative_prompt,
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        sampler=req.sampler,
        progress=progress,
    )
    mode = req.quality_enhance or pipe.enhance_mode
    images = cascade(images, pipe.enhancer, req.width, req.height, mode)
    size = (images.shape[-1], images.shape[-2])
    for img, seed, path in zip(images, seeds, paths, strict=True):
        save_png(img, path, parameters_text(req, seed, size, pipe.model_hash, model_name))
    return paths
