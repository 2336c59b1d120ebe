"""``moas generate``'s flags: the model, the prompt, the sampler, the size, image-to-image, panels and
batches. The other commands' flags are in ``moas.cli.args``."""

from __future__ import annotations

import argparse

from moas.config import SampleConfig
from moas.diffusion.registry import SAMPLER_NAMES

EPILOG_GENERATE = """examples:
  moas generate --model models/best_model.safetensors --prompt "1girl, red hair, blue eyes, forest" --output result.png
  moas generate --prompt "1girl, pink hair, beach" --num_images 4 --seed 7 --sampler euler_a
  moas generate --prompt "1girl, pink hair, beach" --num_images 8 --keep_best 2   # the 2 best of 8
  moas generate --prompt "1girl, red hair, forest, smile | 1girl, red hair, forest, open mouth" \\
      --panels --output story.png
      # 2 panels: story_panel0.png, story_panel1.png, the strip story.png and story_panels.json
      # (the temporal consistency of each consecutive pair)
  moas generate --prompt "1girl, blue hair, beach" --panels 4 --output strip.png   # one prompt, 4 panels
  moas generate --from_file prompts.txt --output out/batch.png   # out/batch_000.png, one per line
  moas generate --prompt "1girl, silver hair, night city" --init_image sketch.png --strength 0.6
Same seed, prompt and settings → the same image. Settings are stored in the PNG (A1111 'parameters')."""


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="models/best_model.safetensors",
        help="model file written by training (default models/best_model.safetensors)",
    )
    p.add_argument(
        "--prompt", help="what to draw; Danbooru-style tags work best, e.g. '1girl, red hair, forest'"
    )
    p.add_argument(
        "--negative_prompt", default="", help="what to steer away from (replaces the null prompt in guidance)"
    )
    p.add_argument(
        "--output",
        default="result.png",
        help="PNG path; with --num_images > 1 files are numbered result_000.png…",
    )
    p.add_argument("--num_images", type=int, default=1, help="how many images (seeds seed, seed+1, …)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"sampler steps (default from the model's config, {SampleConfig.steps})",
    )
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance scale; 1 turns guidance off",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first image")
    p.add_argument(
        "--keep_best",
        type=int,
        default=None,
        help="score every image with the quality expert and keep only the K best (written best first)",
    )
    p.add_argument(
        "--allow_nsfw",
        action="store_true",
        help="generate even when the prompt matches the NSFW blacklist (refused otherwise)",
    )
    p.add_argument(
        "--sampler",
        choices=SAMPLER_NAMES,
        default=None,
        help="sampler (default from the model's config, usually " + SampleConfig.sampler + ")",
    )
    _add_generate_size(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--style",
        help="artist style learned from a data folder (model trained with data.extract_style = true)",
    )
    _add_generate_modes(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--explain",
        action="store_true",
        help="print the brain's routing weight per expert, the top emotions and the detected language",
    )


def _add_generate_size(p: argparse.ArgumentParser) -> None:
    """The output size and how the base image is brought to it."""
    p.add_argument(
        "--width",
        type=int,
        help="output width in pixels (default: the cascade's output, base x sr.scale, or the base without a "
        "super-resolution stage; alone: a square). The model draws at "
        "its trained aspect bucket nearest width/height, upscales and centre-crops; an aspect it never "
        "trained on is refused",
    )
    p.add_argument(
        "--height",
        type=int,
        help="output height in pixels (default as --width; alone: a square)",
    )
    p.add_argument(
        "--upscaler",
        choices=["diffusion", "enhancer", "bicubic"],
        default=None,
        help="how the base image is brought to the output size: diffusion (the cascade's super-resolution "
        "stage: draws new detail, slowest), enhancer (the feed-forward QualityEnhancer: sharpens, fast) or "
        "bicubic (plain resizing); default: the first of these the model file has",
    )
    p.add_argument(
        "--quality_enhance",
        choices=["full", "resolution", "detail", "color", "none"],
        default=None,
        help="post-processing by the trained QualityEnhancer: full (default), resolution (super-resolution "
        "only), detail, color, or none (bicubic resizing)",
    )


def _add_generate_modes(p: argparse.ArgumentParser) -> None:
    """Batch (--from_file), image-to-image (--init_image) and panel sequences (--panels)."""
    p.add_argument(
        "--panels",
        type=int,
        nargs="?",
        const=0,
        default=None,
        metavar="N",
        help="panel mode: N panels in sequence (seeds seed, seed+1, …); the memory expert of panel k sees "
        "panels 0..k-1. --prompt 'a | b | c' gives one prompt per panel (N defaults to their count), one "
        "prompt is reused. Writes <stem>_panel<k>.png, the strip as --output and <stem>_panels.json with the "
        "temporal-consistency metric (lower = more consistent). Not with --num_images or --keep_best",
    )
    p.add_argument(
        "--from_file",
        metavar="FILE",
        help="a batch: one prompt per line, each optionally followed by --seed N, --steps N, --scale X, "
        "--negative TEXT; the model loads once; line k is written as <stem>_<k>.png (instead of --prompt)",
    )
    p.add_argument(
        "--init_image",
        metavar="PATH",
        help="image-to-image: start from this image (centre-cropped and resized to the model's resolution)",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=0.75,
        help="with --init_image: how much to change it, 0 (keep it) to 1 (ignore it; plain text-to-image "
        "with the same seed); default 0.75",
    )
