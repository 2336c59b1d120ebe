"""``moas generate``: prompt → PNG files with the generation parameters embedded (A1111-style).

The safety expert refuses prompts that match the NSFW blacklist (``moas.safety``) unless ``allow_nsfw``
is set; the quality expert (``moas.eval.quality.quality_score``) scores every image, and ``keep_best`` keeps
only the K best of ``num_images`` (written best first, with the score in the PNG parameters).

Panel mode (``panels`` set; ``moas generate --panels N``): N panels are generated one after another
with seeds seed, seed+1, …; panel k's memory expert receives panels 0..k−1 (their base-resolution
images, encoded by the model's PanelMemory). ``--prompt "a | b | c"`` gives one prompt per panel, a
single prompt is reused. Each panel is written as ``<stem>_panel<k>.png``, the ``--output`` file is the
horizontal strip, and ``<stem>_panels.json`` holds the temporal-consistency metric
(``moas.losses.temporal``) of every consecutive pair and its mean, computed on the base-resolution
panels (the resolution the training loss sees).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from moas.config import SampleConfig
from moas.data.dataset import to_model_range
from moas.diffusion.registry import SAMPLERS
from moas.errors import MoasError
from moas.eval.quality import quality_score
from moas.inference.aspect import base_size, requested_size, trained_sizes
from moas.inference.image_input import init_image
from moas.inference.pipeline import Pipeline
from moas.inference.upscale import UPSCALERS, choose_upscaler, output_side, upscale
from moas.io import atomic_write_bytes
from moas.models.enhance import MODES
from moas.safety import blacklisted_terms

log = logging.getLogger(__name__)


@dataclass
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    steps: int = SampleConfig.steps
    guidance_scale: float = SampleConfig.guidance_scale
    seed: int = 0
    sampler: str = SampleConfig.sampler
    width: int | None = None
    height: int | None = None
    style: str | None = None  # artist style from the model's style database (--style)
    allow_nsfw: bool = False  # explicit opt-in to prompts that match the NSFW blacklist
    keep_best: int | None = None  # keep only the K best-scoring of num_images
    quality_enhance: str | None = None  # full | resolution | detail | color | none; None: the model's default
    panels: int | None = None  # panel mode: number of panels (0 = one per '|'-separated prompt)
    init_image: str | None = None  # image-to-image: the image to start from (--init_image)
    strength: float = 0.75  # image-to-image: share of the schedule run from it (0 = the image, 1 = txt2img)
    upscaler: str | None = None  # diffusion | enhancer | bicubic; None: the best the model file has


def panel_prompts(req: GenerateRequest) -> list[str]:
    """One prompt per panel: the '|'-separated prompts, or the single prompt repeated ``panels`` times."""
    prompts = [p.strip() for p in req.prompt.split("|")]
    if any(not p for p in prompts):
        raise MoasError('Every panel prompt must be non-empty, e.g. --prompt "1girl, forest | 1girl, beach".')
    n = req.panels or len(prompts)
    if len(prompts) == 1:
        return prompts * n
    if len(prompts) != n:
        raise MoasError(
            f"--panels {n} does not match the {len(prompts)} '|'-separated prompts; give one per panel."
        )
    return prompts


def validate_request(req: GenerateRequest) -> None:
    if not req.prompt or not req.prompt.strip():
        raise MoasError(
            'The prompt is empty; describe the image, e.g. --prompt "1girl, red hair, blue eyes, forest".'
        )
    if req.num_images < 1:
        raise MoasError("--num_images must be at least 1.")
    if req.keep_best is not None and not 1 <= req.keep_best <= req.num_images:
        raise MoasError(
            f"--keep_best must be between 1 and --num_images ({req.num_images}), got {req.keep_best}."
        )
    found = blacklisted_terms(req.prompt)
    if found and not req.allow_nsfw:
        raise MoasError(
            f"The prompt contains blacklisted terms ({', '.join(found)}), so generation is refused; "
            "pass --allow_nsfw to generate it anyway."
        )
    if req.steps < 1 or req.steps > 1000:
        raise MoasError("--steps must be between 1 and 1000.")
    if req.upscaler is not None and req.upscaler not in UPSCALERS:
        raise MoasError(f"--upscaler must be one of {', '.join(UPSCALERS)}.")
    if req.quality_enhance is not None and req.quality_enhance not in MODES:
        raise MoasError(f"--quality_enhance must be one of {', '.join(MODES)}.")
    if req.panels is not None:
        if req.panels < 0 or req.panels > 64:
            raise MoasError("--panels must be between 1 and 64.")
        if req.num_images != 1 or req.keep_best is not None:
            raise MoasError(
                "--panels makes one sequence; it cannot be combined with --num_images or --keep_best."
            )
        panel_prompts(req)
    if req.init_image is not None:
        if not 0.0 <= req.strength <= 1.0:
            raise MoasError(f"--strength must be between 0 and 1, got {req.strength:g}.")
        if req.panels is not None:
            raise MoasError("--init_image cannot be combined with --panels.")
        if not Path(req.init_image).is_file():
            raise MoasError(f"The init image {req.init_image} does not exist.")
    for name, v in (("--width", req.width), ("--height", req.height)):
        if v is not None and not 8 <= v <= 4096:
            raise MoasError(f"{name} must be between 8 and 4096 pixels.")


def parameters_text(
    req: GenerateRequest,
    seed: int,
    size: tuple[int, int],
    model_hash: str,
    model_name: str,
    quality: float | None = None,
    base: tuple[int, int] | None = None,
    stages: str | None = None,
) -> str:
    """The A1111 ``parameters`` chunk: prompt, negative prompt, then one line of key: value pairs.
    ``base``: the size the diffusion model drew at, when the output was brought up from it; ``stages``:
    how it was brought up (:func:`moas.inference.upscale.upscale`)."""
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    lines.append(
        f"Steps: {req.steps}, Sampler: {sampler_label(req.sampler)}, CFG scale: {req.guidance_scale:g}, "
        f"Seed: {seed}, Size: {size[0]}x{size[1]}, "
        + (f"Base size: {base[0]}x{base[1]}, " if base and tuple(base) != tuple(size) else "")
        + f"Model hash: {model_hash}, Model: {model_name}, "
        + (f"Style: {req.style}, " if req.style else "")
        + f"Quality enhance: {req.quality_enhance or 'default'}, "
        + (f'Stages: "{stages}", ' if stages else "")
        + (
            f"Denoising strength: {req.strength:g}, Init image: {Path(req.init_image).name}, "
            if req.init_image
            else ""
        )
        + "Version: moas"
        + (f", Quality: {quality:.4f}" if quality is not None else "")
    )
    return "\n".join(lines)


def sampler_label(name: str) -> str:
    spec = SAMPLERS.get(name)
    return spec.label if spec else name


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


def plan_size(pipe: Pipeline, req: GenerateRequest) -> tuple[tuple[int, int], tuple[int, int]]:
    """((base width, base height), (output width, output height)) for a request: the trained bucket
    nearest the requested aspect ratio, and the requested size (the base square when none is given)."""
    target = requested_size(req.width, req.height, output_side(pipe))
    base = base_size(*target, trained_sizes(pipe.model_config, pipe.resolution))
    if base[0] / base[1] != target[0] / target[1]:
        log.info(
            "Drawing at the trained size %dx%d (the nearest to %dx%d's aspect), then cropping to %dx%d.",
            *base,
            *target,
            *target,
        )
    return base, target


def generate(
    pipe: Pipeline, req: GenerateRequest, output: str | Path, model_name: str, progress: bool = True
) -> list[Path]:
    validate_request(req)
    upscaler = choose_upscaler(pipe, req.upscaler)
    base, target = plan_size(pipe, req)
    keep = req.keep_best or req.num_images
    paths = output_paths(output, keep)
    seeds = [req.seed + i for i in range(req.num_images)]
    pipe.set_style(req.style)
    init = None
    if req.init_image is not None:
        init = init_image(req.init_image, base[1], base[0])
        init = init[None].expand(req.num_images, -1, -1, -1)
    images = pipe(
        [req.prompt] * req.num_images,
        seeds=seeds,
        negative_prompt=req.negative_prompt,
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        sampler=req.sampler,
        progress=progress,
        init_images=init,
        strength=req.strength,
        size=base,
    )
    mode = req.quality_enhance or pipe.enhance_mode
    images, stages = upscale(pipe, images, upscaler, target, [req.prompt] * len(seeds), seeds, mode, progress)
    size = (images.shape[-1], images.shape[-2])
    scores: list[float | None] = [None] * len(images)
    order = list(range(len(images)))
    if req.keep_best is not None:
        scores = quality_score(images).tolist()
        order = sorted(order, key=lambda i: -scores[i])[:keep]  # best first; ties keep seed order
        log.info(
            "Quality scores: %s; kept seeds %s.",
            ", ".join(f"seed {s} {q:.3f}" for s, q in zip(seeds, scores, strict=True)),
            ", ".join(str(seeds[i]) for i in order),
        )
    for i, path in zip(order, paths, strict=True):
        text = parameters_text(req, seeds[i], size, pipe.model_hash, model_name, scores[i], base, stages)
        save_png(images[i], path, text)
    return paths


def generate_panels(
    pipe: Pipeline, req: GenerateRequest, output: str | Path, model_name: str, progress: bool = True
) -> tuple[list[Path], dict]:
    """Panel mode (module docstring): returns the written files (panels, strip, metric JSON) and the metric."""
    from moas.losses.temporal import sequence_metrics

    validate_request(req)
    upscaler = choose_upscaler(pipe, req.upscaler)
    base_wh, target = plan_size(pipe, req)
    out = output_paths(output, 1)[0]
    prompts = panel_prompts(req)
    if not getattr(pipe.model, "panel_memory", False):
        log.warning("This model has no panel memory; the panels are generated without seeing each other.")
    pipe.set_style(req.style)
    base: list[torch.Tensor] = []  # base-resolution panels, uint8 (3, h, w)
    for k, prompt in enumerate(prompts):
        history = torch.stack(base[::-1])[None] if base else None  # (1, k, 3, h, w), nearest first
        img = pipe(
            [prompt],
            seeds=[req.seed + k],
            negative_prompt=req.negative_prompt,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            sampler=req.sampler,
            progress=progress,
            panels=history,
            size=base_wh,
        )
        base.append(img[0])
    lc = pipe.loss_weights
    metric = sequence_metrics(
        to_model_range(torch.stack(base)),
        lc.get("temporal_character_weight", 0.3),
        lc.get("temporal_scene_weight", 0.2),
    )
    seeds = [req.seed + k for k in range(len(prompts))]
    mode = req.quality_enhance or pipe.enhance_mode
    images, stages = upscale(pipe, torch.stack(base), upscaler, target, prompts, seeds, mode, progress)
    size = (images.shape[-1], images.shape[-2])
    paths = []
    for k, prompt in enumerate(prompts):
        path = out.with_name(f"{out.stem}_panel{k}.png")
        panel_req = GenerateRequest(**{**req.__dict__, "prompt": prompt})
        text = parameters_text(
            panel_req, req.seed + k, size, pipe.model_hash, model_name, base=base_wh, stages=stages
        )
        save_png(images[k], path, text + f", Panel: {k + 1}/{len(prompts)}")
        paths.append(path)
    strip = torch.cat(list(images), dim=-1)  # (3, H, N·W): the panels left to right
    text = parameters_text(
        GenerateRequest(**{**req.__dict__, "prompt": " | ".join(prompts)}),
        req.seed,
        size,
        pipe.model_hash,
        model_name,
    )
    save_png(
        strip,
        out,
        text
        + f", Panels: {len(prompts)}, Temporal consistency: {metric['mean'].get('temporal_consistency', 0.0):.4f}",
    )
    paths.append(out)
    report = {"prompts": prompts, "seeds": [req.seed + k for k in range(len(prompts))], **metric}
    report["files"] = [str(p) for p in paths]
    json_path = out.with_name(f"{out.stem}_panels.json")
    atomic_write_bytes(json_path, (json.dumps(report, indent=2) + "\n").encode())
    paths.append(json_path)
    return paths, report


def describe_metric(report: dict) -> str:
    """Human-readable lines of the temporal-consistency metric (lower = more consistent)."""
    lines = ["temporal consistency between consecutive panels (lower = more consistent):"]
    for p in report["pairs"]:
        a, b = p["pair"]
        lines.append(
            f"  panel {a}→{b}: {p['temporal_consistency']:.4f} (feature {p['feature']:.4f}, "
            f"character {p['character']:.4f}, scene {p['scene']:.4f})"
        )
    m = report["mean"]
    if m:
        lines.append(
            f"  mean: {m['temporal_consistency']:.4f} (feature {m['feature']:.4f}, "
            f"character {m['character']:.4f}, scene {m['scene']:.4f})"
        )
    else:
        lines.append("  (one panel: no pair to compare)")
    return "\n".join(lines)
