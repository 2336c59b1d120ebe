"""``moas eval``: does the model follow prompts? Per-attribute accuracy on seen and held-out combinations.

Prompts come from the demo manifest (``moas.data.synthetic.eval_cases``): one half uses hair-colour ×
background pairs that never occur in training (held out), the other half seen combinations. Each image is
judged by ``moas.eval.attributes.measure_attributes`` — a fixed region-colour measurement that knows nothing
about the generator.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from moas.data.synthetic import eval_cases, load_manifest
from moas.eval.attributes import attribute_accuracy, format_accuracy_table, measure_attributes
from moas.inference.pipeline import Pipeline
from moas.inference.upscale import resize_to
from moas.io import atomic_write_bytes

log = logging.getLogger(__name__)

MIN_MEASURE_SIZE = 32


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
    steps, guidance_scale, sampler = pipe.settings(steps, guidance_scale, sampler)
    manifest = load_manifest(data_dir)
    cases = eval_cases(manifest, n_per_split, seed)
    preds: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(cases), desc="eval", unit="img", disable=not progress)
    for i in range(0, len(cases), batch_size):
        part = cases[i : i + batch_size]
        images = pipe(
            [c["prompt"] for c in part],
            seeds=[c["seed"] for c in part],
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
        )
        if images.shape[-1] < MIN_MEASURE_SIZE:  # the region measurement needs a few pixels per region
            images = resize_to(images, MIN_MEASURE_SIZE, MIN_MEASURE_SIZE)
        for c, img in zip(part, images, strict=True):
            arr = img.permute(1, 2, 0).numpy()
            preds.append(measure_attributes(arr))
            if image_dir is not None:
                from PIL import Image

                Path(image_dir).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(Path(image_dir) / f"{len(preds) - 1:04d}_{c['split']}.png")
        bar.update(len(part))
    bar.close()
    result = attribute_accuracy(cases, preds)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["settings"] = {
        "n_per_split": n_per_split,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "sampler": sampler,
        "seed": seed,
        "model_hash": pipe.model_hash,
    }
    result["cases"] = [
        {**c, "predicted": {k: p.get(k) for k in ("hair_color", "eye_color", "background")}}
        for c, p in zip(cases, preds, strict=True)
    ]
    return result


def write_json(result: dict, path: str | Path) -> None:
    atomic_write_bytes(Path(path), json.dumps(result, indent=2).encode())


def summary(result: dict) -> str:
    return format_accuracy_table(result)
