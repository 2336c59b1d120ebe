"""Per-character measurement of two-character demo scenes, and binding accuracy.

A two-character scene (:mod:`moas.data.synthetic_scene`) puts a half-size copy of the single-character
layout in each bottom quarter, so each girl is measured by cropping her quarter and handing it to
:func:`moas.eval.attributes.measure_attributes`, whose fixed regions and prototypes then apply unchanged
(the prototypes include 32 px renders, the size of a girl in a 64 px scene). The background is measured
on the whole image: its top corners and side bands are background only, as in the single-character set.

No learning is involved, and nothing of the drawer is imported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from moas.errors import DataError
from moas.eval.attributes import CANON, MIN_SIZE, measure_attributes

# x0, y0, x1, y1 as fractions of the image (a copy of moas.data.synthetic_scene.CHARACTER_BOXES).
CHARACTER_BOXES = {"left": (0.0, 0.5, 0.5, 1.0), "right": (0.5, 0.5, 1.0, 1.0)}
CHARACTER_ATTRIBUTES = ("hair_color", "eye_color")


def _as_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise DataError(f"Expected a PIL image or a uint8 HxWx3 array, got {arr.dtype} array {arr.shape}.")
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]))


def measure_characters(image: Any) -> dict:
    """Hair and eye colour of the left and right girl, and the shared background.

    Returns ``{"left": {...}, "right": {...}, "background": name, "background_distance": d,
    "background_margin": m}``; each side holds hair_color, eye_color and their ``_distance`` /
    ``_margin`` as :func:`measure_attributes` defines them."""
    img = _as_image(image)
    if min(img.size) < 2 * MIN_SIZE:  # each quarter must reach the single-character minimum
        img = img.resize((2 * CANON, 2 * CANON), Image.Resampling.BILINEAR)
    w, h = img.size
    out: dict[str, Any] = {}
    for side, (x0, y0, x1, y1) in CHARACTER_BOXES.items():
        crop = img.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)))
        found = measure_attributes(crop)
        out[side] = {k: v for k, v in found.items() if not k.startswith("background")}
    scene = measure_attributes(img)
    out |= {k: v for k, v in scene.items() if k.startswith("background")}
    return out


def binding_accuracy(cases: list[dict], predictions: list[dict]) -> dict:
    """Per-split accuracy of ``predictions`` (from :func:`measure_characters`) against ``cases``.

    Columns: each side's hair / eye colour, ``background`` (when predicted), ``hair_bound`` (both hair
    colours right), ``both_bound`` (both girls' hair and eyes right), ``hair_swapped`` (the two hair
    colours exchanged: the error of a model that ignores which side a tag names) and ``mean`` (of the
    four per-character columns). ``n`` holds the number of cases per split."""
    if len(cases) != len(predictions):
        raise DataError(f"Got {len(cases)} evaluation cases but {len(predictions)} predictions.")
    columns = [f"{side}_{a}" for side in CHARACTER_BOXES for a in CHARACTER_ATTRIBUTES]
    with_bg = all("background" in p for p in predictions)
    result: dict[str, Any] = {"n": {}}
    for split in dict.fromkeys(c.get("split", "all") for c in cases):
        pairs = [(c, p) for c, p in zip(cases, predictions, strict=True) if c.get("split", "all") == split]
        hits = {col: [] for col in columns}
        bound, both, swapped, bg = [], [], [], []
        for c, p in pairs:
            for side in CHARACTER_BOXES:
                for a in CHARACTER_ATTRIBUTES:
                    hits[f"{side}_{a}"].append(p.get(side, {}).get(a) == c[side][a])
            bound.append(hits["left_hair_color"][-1] and hits["right_hair_color"][-1])
            both.append(all(hits[col][-1] for col in columns))
            got = (p.get("left", {}).get("hair_color"), p.get("right", {}).get("hair_color"))
            swapped.append(got == (c["right"]["hair_color"], c["left"]["hair_color"]))
            bg.append(p.get("background") == c["background"])
        row = {col: float(np.mean(v)) for col, v in hits.items()}
        if with_bg:
            row["background"] = float(np.mean(bg))
        row |= {"hair_bound": float(np.mean(bound)), "both_bound": float(np.mean(both))}
        row |= {"hair_swapped": float(np.mean(swapped)), "mean": float(np.mean([row[c] for c in columns]))}
        result[split] = row
        result["n"][split] = len(pairs)
    return result
