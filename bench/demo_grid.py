"""The README's picture: eight samples of a trained model through its cascade, beside their base images.

    python bench/demo_grid.py --model models/best_model.safetensors --out docs/images/demo.png

Four prompts × seeds 3 and 4, drawn as ``moas generate`` draws them (the model's own sampler settings and
upscaler, at its default output size). Each sample is shown as the output, with its base image enlarged
by pixel repetition in the row below, so the grid shows what the upscaler added.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from moas.inference.generate import (
    GenerateRequest,  # noqa: E402
    plan_size,  # noqa: E402
)
from moas.inference.pipeline import Pipeline  # noqa: E402
from moas.inference.upscale import choose_upscaler, upscale  # noqa: E402

PROMPTS = (
    "1girl, blonde hair, blue eyes, forest",
    "1girl, pink hair, green eyes, beach",
    "1girl, red hair, blue eyes, classroom",
    "1girl, silver hair, red eyes, night city",
)
SEEDS = (3, 4)


def draw(pipe: Pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, base images enlarged to the output size), uint8 (N, 3, H, W), prompt-major."""
    req = GenerateRequest(prompt=PROMPTS[0])
    base_size, target = plan_size(pipe, req)
    prompts = [p for p in PROMPTS for _ in SEEDS]
    seeds = [s for _ in PROMPTS for s in SEEDS]
    base = pipe(prompts, seeds=seeds, size=base_size)
    out, _ = upscale(pipe, base, choose_upscaler(pipe, None), target, prompts, seeds, pipe.enhance_mode)
    k = out.shape[-1] // base.shape[-1]
    return out, base.repeat_interleave(k, -1).repeat_interleave(k, -2)


def grid(out: torch.Tensor, base: torch.Tensor) -> Image.Image:
    """Columns: the samples; first row the outputs, second row their base images."""
    n, side = len(out), out.shape[-1]
    canvas = Image.new("RGB", (n * side, 2 * side), "white")
    for i in range(n):
        for row, src in enumerate((out[i], base[i])):
            canvas.paste(Image.fromarray(src.permute(1, 2, 0).numpy()), (i * side, row * side))
    return canvas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/best_model.safetensors")
    p.add_argument("--out", default="docs/images/demo.png")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    pipe = Pipeline.from_file(args.model, torch.device("cpu"))
    out, base = draw(pipe)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid(out, base).save(args.out)
    print(
        f"wrote {args.out}: {len(out)} samples at {out.shape[-1]} px over their {pipe.resolution} px base images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
