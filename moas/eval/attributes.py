"""Generator-independent measurement of hair colour, eye colour and background in demo-style images.

No learning is involved: the demo dataset (:mod:`moas.data.synthetic`) has a fixed layout, so each attribute
is read from a fixed image region with a robust statistic and matched to the nearest colour prototype in
CIELAB:

* hair colour: per-channel median of the hair cap window (x 0.36-0.64, y 0.19-0.31);
* background: medians of the top corners (x < 0.14 or > 0.86, y < 0.26) and of the side bands (x < 0.09 or
  > 0.91, 0.30 < y < 0.50), compared as one 6-D vector;
* eye colour: in two Gaussian-weighted windows around the irises (x 0.39 / 0.61 +- 0.08, y 0.445-0.67), the
  median of the 30 most colourful (chroma x weight) pixels after a 3x3 mean. Skin, sclera, lashes and
  outlines are all low-chroma, so those pixels are the iris even under +-3% jitter, glasses or blur.

Prototypes are not hand-set: they are the same statistics measured on clean renders of every value by every
artist from :mod:`moas.data.synthetic` (plus 32 px and blurred 32 px copies of those renders), so the
palettes, cel shadows, shine bands and small-image colour bleeding are all part of them. They are stored in
``attribute_prototypes.json`` so that measuring needs nothing of the drawer; a test re-measures them from
fresh renders and compares.

Images of any size >= 24 px are resized to a canonical 64 x 64 first.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from moas.errors import DataError

CANON = 64
MIN_SIZE = 24
HAIR_BOX = (0.36, 0.19, 0.64, 0.31)  # x0, y0, x1, y1 as fractions of the image
EYE_CENTRES = ((0.39, 0.545), (0.61, 0.545))  # the demo's iris centres (moas.data.synthetic.EYES)
EYE_WINDOW = (0.08, 0.10, 0.125)  # half width, extent above, extent below the eye centre
EYE_SIGMA = (0.05, 0.06)
EYE_TOP_K = 30  # pixels (of 64x64) kept as "iris": the most colourful, centre-weighted ones
ATTRIBUTES = ("hair_color", "eye_color", "background")


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-255, shape (..., 3)) to CIELAB (D65)."""
    c = np.asarray(rgb, np.float32) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], np.float32)
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883], np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    return np.stack(
        [116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], axis=-1
    )


def _canonical(image: Any) -> np.ndarray:
    """Any PIL image or uint8 HxWx3(4) array -> float32 Lab array of shape (CANON, CANON, 3)."""
    if isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
            raise DataError(
                f"Expected a PIL image or a uint8 HxWx3 array, got {arr.dtype} array {arr.shape}."
            )
        img = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    if min(img.size) < MIN_SIZE:
        raise DataError(
            f"Image is {img.size[0]}x{img.size[1]} pixels; attribute measurement needs >= {MIN_SIZE}."
        )
    if img.size != (CANON, CANON):
        shrink = min(img.size) > CANON
        img = img.resize((CANON, CANON), Image.Resampling.LANCZOS if shrink else Image.Resampling.BILINEAR)
    return rgb_to_lab(np.asarray(img))


def _grid() -> tuple[np.ndarray, np.ndarray]:
    g = (np.arange(CANON, dtype=np.float32) + 0.5) / CANON
    return g[None, :], g[:, None]


def _hair_feature(lab: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = (round(t * CANON) for t in HAIR_BOX)
    return np.median(lab[y0:y1, x0:x1].reshape(-1, 3), axis=0)


def _background_feature(lab: np.ndarray) -> np.ndarray:
    x, y = _grid()
    top = ((x < 0.14) | (x > 0.86)) & (y < 0.26)
    side = ((x < 0.09) | (x > 0.91)) & (y > 0.30) & (y < 0.50)
    return np.concatenate([np.median(lab[top], axis=0), np.median(lab[side], axis=0)])


@functools.lru_cache(maxsize=1)
def _eye_weights() -> np.ndarray:
    x, y = _grid()
    w = np.zeros((CANON, CANON), np.float32)
    hw, up, down = EYE_WINDOW
    for cx, cy in EYE_CENTRES:
        inside = (np.abs(x - cx) <= hw) & (y >= cy - up) & (y <= cy + down)
        w += inside * np.exp(-0.5 * (((x - cx) / EYE_SIGMA[0]) ** 2 + ((y - cy) / EYE_SIGMA[1]) ** 2))
    return w


def _eye_feature(lab: np.ndarray) -> np.ndarray:
    # A 3x3 mean first: pixel noise would otherwise win the "most colourful pixels" selection below.
    p = np.pad(lab, ((1, 1), (1, 1), (0, 0)), mode="edge")
    smooth = sum(p[i : i + CANON, j : j + CANON] for i in range(3) for j in range(3)) / 9.0
    score = (np.hypot(smooth[..., 1], smooth[..., 2]) * _eye_weights()).ravel()
    top = np.argpartition(score, -EYE_TOP_K)[-EYE_TOP_K:]
    return np.median(smooth.reshape(-1, 3)[top], axis=0)


_FEATURES = {"hair_color": _hair_feature, "eye_color": _eye_feature, "background": _background_feature}


PROTOTYPE_FILE = Path(__file__).with_name("attribute_prototypes.json")


def prototype_groups(
    renders: Iterable[tuple[dict, str, str, Any]],
) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Per attribute: the centroid feature of every (value, artist, variant) group of ``renders``.

    ``renders`` yields (attributes, artist, variant, image): the demo set's clean 64 px renders, the same
    reduced to 32 px and that reduction blurred, so the prototypes already contain cel shadows, shine bands
    and the colour bleeding of small images (``tests/test_attributes.py`` draws them)."""
    groups: dict[tuple[str, str, str, str], list[np.ndarray]] = {}
    for attrs, artist, variant, img in renders:
        lab = _canonical(img)
        for kind, feature in _FEATURES.items():
            groups.setdefault((kind, attrs[kind], artist, variant), []).append(feature(lab))
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    for kind in _FEATURES:
        keys = [k for k in groups if k[0] == kind]
        out[kind] = (np.array([np.mean(groups[k], axis=0) for k in keys]), [k[1] for k in keys])
    return out


def save_prototypes(protos: dict[str, tuple[np.ndarray, list[str]]], path: Path = PROTOTYPE_FILE) -> None:
    data = {k: {"labels": labels, "features": feats.tolist()} for k, (feats, labels) in protos.items()}
    path.write_text(json.dumps(data, indent=1) + "\n")


@functools.lru_cache(maxsize=1)
def _prototypes() -> dict[str, tuple[np.ndarray, list[str]]]:
    """The stored prototypes (measured on renders of every value by every demo artist)."""
    data = json.loads(PROTOTYPE_FILE.read_text())
    return {k: (np.array(v["features"]), list(v["labels"])) for k, v in data.items()}


def _nearest(feature: np.ndarray, kind: str) -> tuple[str, float, float]:
    """Nearest prototype's value, its distance, and the margin to the nearest prototype of another value."""
    feats, labels = _prototypes()[kind]
    d = np.linalg.norm(feats - feature[None, :], axis=1)
    k = int(d.argmin())
    other = min(
        (float(dd) for dd, lab in zip(d, labels, strict=True) if lab != labels[k]), default=float("inf")
    )
    return labels[k], float(d[k]), other - float(d[k])


def measure_attributes(image: Any) -> dict:
    """Measure hair colour, eye colour and background of a demo-layout portrait (PIL image or uint8 array).

    Returns the three names plus, per attribute, ``<hair|eye|background>_distance`` (Lab distance to the
    nearest prototype; large means "does not look like the demo set") and ``..._margin`` (how much further
    the best prototype of any other value is; small means ambiguous).
    """
    lab = _canonical(image)
    out: dict[str, Any] = {}
    for kind, feature in _FEATURES.items():
        name, dist, margin = _nearest(feature(lab), kind)
        out[kind] = name
        out[f"{kind.split('_')[0]}_distance"] = dist
        out[f"{kind.split('_')[0]}_margin"] = margin
    return out


def attribute_accuracy(
    cases: list[dict], predictions: list[dict], attributes: Sequence[str] = ATTRIBUTES
) -> dict:
    """Per-split, per-attribute accuracy of ``predictions`` against ``cases`` (matched by position)."""
    if len(cases) != len(predictions):
        raise DataError(f"Got {len(cases)} evaluation cases but {len(predictions)} predictions.")
    result: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for split in dict.fromkeys(c.get("split", "all") for c in cases):
        idx = [i for i, c in enumerate(cases) if c.get("split", "all") == split]
        row = {a: float(np.mean([predictions[i].get(a) == cases[i][a] for i in idx])) for a in attributes}
        row["mean"] = float(np.mean([row[a] for a in attributes])) if attributes else 0.0
        result[split] = row
        counts[split] = len(idx)
    result["n"] = counts
    return result


def format_accuracy_table(result: dict) -> str:
    """Aligned text table: one row per split, columns = attributes + mean (+ n when known).

    Keys of ``result`` that are not split rows (``n``, or extras a caller added such as settings) are skipped.
    """
    splits = [k for k, v in result.items() if k != "n" and isinstance(v, dict) and "mean" in v]
    if not splits:
        return "(no evaluation cases)"
    cols = list(result[splits[0]])
    counts = result.get("n", {})
    header = ["split", *cols] + (["n"] if counts else [])
    rows = [header]
    for s in splits:
        rows.append([s, *(f"{result[s].get(c, float('nan')):.3f}" for c in cols)])
        rows[-1] += [str(counts.get(s, ""))] if counts else []
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for r in rows:  # split names left-aligned, numbers right-aligned
        cells = [v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join([r[0].ljust(widths[0]), *cells]))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
