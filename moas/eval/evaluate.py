"""``moas eval``: does the model follow prompts? Per-attribute accuracy on seen and held-out combinations.

Prompts come from the demo manifest (``moas.data.synthetic.eval_cases``): one half uses hair-colour ×
background pairs that never occur in training (held out), the other half seen combinations. Each image is
judged by ``moas.eval.attributes.measure_attributes`` — a fixed region-colour measurement that knows nothing
about the generator.

On a two-character demo set (manifest ``"scene": "two"``) the prompts come from
``moas.data.synthetic_scene.binding_eval_cases`` (held-out and seen (left hair, right hair) bindings) and
each image is judged per girl by ``moas.eval.binding.measure_characters``; the result is the binding table
of ``moas.eval.binding.binding_accuracy`` and carries ``"scene": "two"``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moas.data.synthetic import eval_cases, load_manifest
from moas.data.synthetic_scene import binding_eval_cases
from moas.eval.attributes import attribute_accuracy, format_accuracy_table, measure_attributes
from moas.eval.binding import binding_accuracy, measure_characters
from moas.inference.pipeline import Pipeline
from moas.inference.upscale import resize_to
from moas.io import atomic_write_bytes

log = logging.getLogger(__name__)

MIN_MEASURE_SIZE = 32
SCENE_TWO = "two"


def _draw(
    pipe: Pipeline,
    cases: list[dict],
    settings: tuple[int, float, str],
    min_size: int,
    batch_size: int,
    progress: bool,
    image_dir: str | Path | None,
) -> Iterator[np.ndarray]:
    """The image of each case (uint8 HxWx3), in order, at least ``min_size`` px; saved when asked."""
    steps, guidance_scale, sampler = settings
    bar = tqdm(total=len(cases), desc="eval", unit="img", disable=not progress)
    done = 0
    for i in range(0, len(cases), batch_size):
        part = cases[i : i + batch_size]
        images = pipe(
            [c["prompt"] for c in part],
            seeds=[c["seed"] for c in part],
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
        )
        if images.shape[-1] < min_size:  # the region measurement needs a few pixels per region
            images = resize_to(images, min_size, min_size)
        for c, img in zip(part, images, strict=True):
            arr = img.permute(1, 2, 0).numpy()
            if image_dir is not None:
                from PIL import Image

                Path(image_dir).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(Path(image_dir) / f"{done:04d}_{c['split']}.png")
            done += 1
            yield arr
        bar.update(len(part))
    bar.close()


def _predicted(pred: dict, two: bool) -> dict:
    """The part of a measurement that the JSON result keeps next to each case."""
    if not two:
        return {k: pred.get(k) for k in ("hair_color", "eye_color", "background")}
    sides = {s: {k: pred.get(s, {}).get(k) for k in ("hair_color", "eye_color")} for s in ("left", "right")}
    return {**sides, "background": pred.get("background")}


def run_eval(
    pipe: Pipeline,
    data_dir: str | Path,
    n_per_split: int = 48,
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    seed: int = 1234,
    batch_size: int = 16,
    progress: bool = True,
    image_dir: str | Path | None = None,
) -> dict:
    """Draw ``n_per_split`` held-out and seen demo prompts and score them (module docstring)."""
    steps, guidance_scale, sampler = pipe.settings(steps, guidance_scale, sampler)
    manifest = load_manifest(data_dir)
    two = manifest.get("scene") == SCENE_TWO
    if two:  # each girl gets a quarter of the image: the quarter needs the single-character minimum
        cases, measure = binding_eval_cases(manifest, n_per_split, seed), measure_characters
        min_size = 2 * MIN_MEASURE_SIZE
    else:
        cases, measure = eval_cases(manifest, n_per_split, seed), measure_attributes
        min_size = MIN_MEASURE_SIZE
    t0 = time.perf_counter()
    settings = (steps, guidance_scale, sampler)
    drawn = _draw(pipe, cases, settings, min_size, batch_size, progress, image_dir)
    preds = [measure(arr) for arr in drawn]
    result = binding_accuracy(cases, preds) if two else attribute_accuracy(cases, preds)
    if two:
        result["scene"] = SCENE_TWO
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["settings"] = {
        "n_per_split": n_per_split,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "sampler": sampler,
        "seed": seed,
        "model_hash": pipe.model_hash,
    }
    result["cases"] = [{**c, "predicted": _predicted(p, two)} for c, p in zip(cases, preds, strict=True)]
    return result


def write_json(result: dict, path: str | Path) -> None:
    atomic_write_bytes(Path(path), json.dumps(result, indent=2).encode())


def summary(result: dict) -> str:
    """The accuracy table; for a two-character set the binding table, headed by what its columns mean."""
    if result.get("scene") != SCENE_TWO:
        return format_accuracy_table(result)
    note = (
        "two-character binding: left_* / right_* each girl's colours, hair_bound both hair colours right,\n"
        "both_bound both girls fully right, hair_swapped the two hair colours exchanged (lower is better)"
    )
    return note + "\n" + format_accuracy_table(result)
