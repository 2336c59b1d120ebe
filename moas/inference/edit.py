"""``moas edit``: inpainting (``--mask``) and outpainting (``--outpaint L,R,T,B``) with a trained model.

The canvas (the image, extended by the outpaint margins) is scaled to about the model's training area
(sides a multiple of the U-Net's stride), filled by RePaint-style resampling (``moas/diffusion/inpaint.py``),
brought back to the canvas size through the trained enhancer cascade, and composited: every pixel
outside the mask is copied from the input, so it is bit-for-bit unchanged. The seam metrics of the
original (32-px overlap MSE and Sobel attention-edge loss, ``moas/losses/seam.py``) are reported.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moas.config import SampleConfig
from moas.data.dataset import to_model_range, to_uint8
from moas.diffusion.inpaint import repaint
from moas.diffusion.sampling import guided
from moas.diffusion.schedule import NoiseSchedule, make_train_scheduler
from moas.errors import MoasError
from moas.inference.generate import save_png
from moas.inference.image_input import read_array
from moas.inference.pipeline import Pipeline
from moas.inference.upscale import cascade
from moas.losses.seam import seam_metrics

log = logging.getLogger(__name__)

MAX_CANVAS = 4096


@dataclass
class EditRequest:
    image: str
    prompt: str
    mask: str | None = None  # white = regenerate, black = keep
    outpaint: tuple[int, int, int, int] = (0, 0, 0, 0)  # left, right, top, bottom margins in pixels
    negative_prompt: str = ""
    steps: int = SampleConfig.steps
    guidance_scale: float = SampleConfig.guidance_scale
    seed: int = 0
    resample: int = 3  # RePaint jumps per step (1 = no resampling)
    quality_enhance: str | None = None


def parse_outpaint(text: str | None) -> tuple[int, int, int, int]:
    """``"L,R,T,B"`` → four non-negative ints."""
    if not text:
        return (0, 0, 0, 0)
    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 4 or min(parts) < 0:
        raise MoasError(
            f"--outpaint takes four non-negative pixel counts L,R,T,B (e.g. 32,32,0,0), got {text!r}."
        )
    return parts  # type: ignore[return-value]


def load_canvas(req: EditRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """The canvas uint8 (3, H, W) and the region to generate, bool (1, H, W)."""
    rgb = torch.from_numpy(read_array(req.image, "image", "RGB")).permute(2, 0, 1)  # (3, h, w)
    h, w = rgb.shape[-2:]
    if req.mask:
        m = torch.from_numpy(read_array(req.mask, "mask", "L"))[None] >= 128  # (1, h, w)
        if tuple(m.shape[-2:]) != (h, w):
            raise MoasError(
                f"The mask is {m.shape[-1]}x{m.shape[-2]} but the image is {w}x{h}; they must match."
            )
    else:
        m = torch.zeros(1, h, w, dtype=torch.bool)
    left, right, top, bottom = req.outpaint
    H, W = h + top + bottom, w + left + right
    if max(H, W) > MAX_CANVAS:
        raise MoasError(f"The outpainted canvas would be {W}x{H}; the limit is {MAX_CANVAS} px a side.")
    canvas = torch.zeros(3, H, W, dtype=torch.uint8)
    canvas[:, top : top + h, left : left + w] = rgb
    mask = torch.ones(1, H, W, dtype=torch.bool)
    mask[:, top : top + h, left : left + w] = m
    if not mask.any():
        raise MoasError("Nothing to generate: the mask is all black and --outpaint adds no margin.")
    return canvas, mask


def working_size(h: int, w: int, resolution: int, multiple: int) -> tuple[int, int]:
    """About the model's training area, keeping the aspect ratio; sides a multiple of the U-Net stride."""
    k = resolution / math.sqrt(h * w)
    return max(multiple, round(h * k / multiple) * multiple), max(
        multiple, round(w * k / multiple) * multiple
    )


def unet_multiple(pipe: Pipeline) -> int:
    m = pipe.model.init_args["model"]
    return int(m["patch_size"]) * 2 ** (len(m["block_channels"]) - 1)


def edit(pipe: Pipeline, req: EditRequest, output: str | Path, progress: bool = True) -> dict[str, float]:
    """Run the edit, write the PNG, return the seam metrics (plus the kept-pixel check)."""
    if not req.prompt.strip():
        raise MoasError(
            'The prompt is empty; describe what to draw in the masked region, e.g. --prompt "forest".'
        )
    if Path(output).suffix.lower() != ".png":
        raise MoasError(f"--output must be a .png file name, got {Path(output).name}.")
    canvas, mask = load_canvas(req)
    H, W = canvas.shape[-2:]
    wh, ww = working_size(H, W, pipe.resolution, unet_multiple(pipe))
    dev = pipe.device
    known = F.interpolate(to_model_range(canvas[None]), size=(wh, ww), mode="bicubic", antialias=True).clamp(
        -1, 1
    )
    small_mask = (F.adaptive_max_pool2d(mask[None].float(), (wh, ww)) > 0).float()  # (1, 1, wh, ww)
    cond, uncond = pipe.branches([req.prompt], req.negative_prompt)  # --style: conditional branch only
    fn = guided(pipe.denoise, cond, uncond, req.guidance_scale)
    schedule = NoiseSchedule(make_train_scheduler(pipe.diffusion), pipe.diffusion.prediction_type, 0.0)
    with torch.no_grad():
        x = repaint(
            fn, schedule, known.to(dev), small_mask.to(dev), [req.seed], req.steps, req.resample, progress
        )
    mode = req.quality_enhance or pipe.enhance_mode
    generated = cascade(to_uint8(x).cpu(), pipe.enhancer, W, H, mode)[0]  # (3, H, W) uint8
    out = torch.where(mask, generated, canvas)  # the kept region is copied, bit for bit
    metrics = seam_metrics(to_model_range(generated[None]), to_model_range(canvas[None]), mask[None].float())
    metrics["kept_pixels_identical"] = float(torch.equal(out[:, ~mask[0]], canvas[:, ~mask[0]]))
    metrics["generated_fraction"] = mask.float().mean().item()
    params = (
        f"{req.prompt}\n"
        + (f"Negative prompt: {req.negative_prompt}\n" if req.negative_prompt else "")
        + f"Steps: {req.steps}, Sampler: RePaint (DDIM, {req.resample} resamples), CFG scale: {req.guidance_scale:g}, "
        f"Seed: {req.seed}, Size: {W}x{H}, Outpaint: {','.join(map(str, req.outpaint))}, "
        f"Seam overlap MSE: {metrics['overlap_mse']:.5f}, Seam edge loss: {metrics['attention_edge']:.5f}, "
        f"Model hash: {pipe.model_hash}, Version: moas"
    )
    save_png(out, Path(output), params)
    return metrics
