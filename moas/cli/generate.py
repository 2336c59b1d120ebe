"""``moas generate`` and ``moas edit``: the model loaded once, one prompt, a prompt file or panels."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moas.errors import MoasError

log = logging.getLogger("moas")


def load_pipeline(model: str, device: str):
    from moas.device import resolve_device
    from moas.inference.pipeline import Pipeline

    return Pipeline.from_file(model, resolve_device(device))


def _generate_request(a: argparse.Namespace):
    from moas.inference.generate import GenerateRequest

    req = GenerateRequest(
        prompt=a.prompt or "",
        negative_prompt=a.negative_prompt,
        num_images=a.num_images,
        seed=a.seed,
        width=a.width,
        height=a.height,
        style=a.style,
        allow_nsfw=a.allow_nsfw,
        keep_best=a.keep_best,
        quality_enhance=a.quality_enhance,
        upscaler=a.upscaler,
        panels=a.panels,
        init_image=a.init_image,
        strength=a.strength,
    )
    if a.steps is not None:  # checked before loading anything; unset ones come from the model
        req.steps = a.steps
    if a.guidance_scale is not None:
        req.guidance_scale = a.guidance_scale
    return req


def _generate_batch(a: argparse.Namespace, req, progress: bool) -> int:
    from moas.inference.batch import generate_batch, read_batch

    if a.prompt or a.panels is not None:
        raise MoasError("--from_file gives the prompts; it cannot be combined with --prompt or --panels.")
    req.prompt = "batch"  # each line replaces it
    lines = read_batch(a.from_file, req, a.steps is not None, a.guidance_scale is not None)
    pipe = load_pipeline(a.model, a.device)
    paths = generate_batch(pipe, lines, a.output, Path(a.model).stem, a.sampler, progress)
    for p in paths:
        print(f"wrote {p}")
    print(f"{len(lines)} prompts from {a.from_file}, {len(paths)} images")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from moas.inference.generate import generate, validate_request

    req = _generate_request(a)
    progress = not a.quiet and sys.stderr.isatty()
    if a.from_file:
        return _generate_batch(a, req, progress)
    validate_request(req)
    pipe = load_pipeline(a.model, a.device)
    if a.explain:
        print(pipe.explain(req.prompt))
    req.steps, req.guidance_scale, req.sampler = pipe.settings(a.steps, a.guidance_scale, a.sampler)
    if req.panels is not None:
        from moas.inference.generate import describe_metric, generate_panels

        paths, report = generate_panels(pipe, req, a.output, Path(a.model).stem, progress=progress)
        for p in paths:
            print(f"wrote {p}")
        print(describe_metric(report))
        return 0
    paths = generate(pipe, req, a.output, Path(a.model).stem, progress=progress)
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_edit(a: argparse.Namespace) -> int:
    from moas.inference.edit import EditRequest, edit, parse_outpaint

    if (a.steps is not None and not 1 <= a.steps <= 1000) or a.resample < 1:
        raise MoasError("--steps must be between 1 and 1000 and --resample at least 1.")
    req = EditRequest(
        image=a.image,
        prompt=a.prompt,
        mask=a.mask,
        outpaint=parse_outpaint(a.outpaint),
        negative_prompt=a.negative_prompt,
        seed=a.seed,
        resample=a.resample,
        quality_enhance=a.quality_enhance,
    )
    if not req.mask and not any(req.outpaint):
        raise MoasError("Give --mask (white = regenerate) or --outpaint L,R,T,B, or both.")
    pipe = load_pipeline(a.model, a.device)
    pipe.set_style(a.style)
    req.steps, req.guidance_scale, _ = pipe.settings(a.steps, a.guidance_scale)
    m = edit(pipe, req, a.output, progress=not a.quiet)
    print(
        f"wrote {a.output}; seam overlap MSE {m['overlap_mse']:.5f}, Sobel attention-edge loss "
        f"{m['attention_edge']:.5f}, seam loss {m['seam_loss']:.5f}; kept pixels identical: "
        f"{'yes' if m['kept_pixels_identical'] else 'NO'}"
    )
    return 0
