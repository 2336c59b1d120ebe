"""Output size and aspect ratio: draw the base image at the nearest trained bucket, never stretch it.

A model trained with aspect-ratio buckets (``data.bucketing``) has seen every bucket's shape; one trained
without them has seen only its base square. A request for ``width × height`` is drawn at the trained bucket
whose aspect ratio is nearest, brought up to cover the requested size with its aspect kept, and centre-cropped
to it: the crop loses at most the bucket's mismatch, where stretching would squash every figure by it. An
aspect ratio more than ``TOLERANCE`` beyond the most elongated trained bucket is refused: the U-Net has never
drawn that shape, and its images would show it.
"""

from __future__ import annotations

import math

from moas.data.buckets import make_buckets
from moas.errors import MoasError

TOLERANCE = 1.1  # how far beyond the trained range (as a ratio of aspect ratios) a request may go


def trained_sizes(config: dict, resolution: int) -> list[tuple[int, int]]:
    """The ``(width, height)`` base sizes a model was trained at: its buckets when it was trained with them
    (recomputed from its saved configuration exactly as training made them), else its base square."""
    data, model = config.get("data") or {}, config.get("model") or {}
    if not data.get("bucketing"):
        return [(resolution, resolution)]
    divisor = int(model.get("patch_size", 1)) * 2 ** (len(model.get("block_channels", [0])) - 1)
    try:
        return make_buckets(resolution, divisor, float(data.get("bucket_max_aspect", 2.0)))
    except ValueError:  # a configuration this version would not train; only the square is certain
        return [(resolution, resolution)]


def requested_size(width: int | None, height: int | None, resolution: int) -> tuple[int, int]:
    """The output size asked for: both sides as given, one side alone means a square, neither the base."""
    if width is None and height is None:
        return resolution, resolution
    return (width or height, height or width)  # type: ignore[return-value]


def base_size(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The trained base size whose aspect ratio is nearest ``width / height`` (ties: the squarer one).

    Raises :class:`MoasError` when the ratio lies more than ``TOLERANCE`` beyond the trained range."""
    target = math.log(width / height)
    logs = [math.log(w / h) for w, h in sizes]
    lo, hi = min(logs), max(logs)
    if target > hi + math.log(TOLERANCE) or target < lo - math.log(TOLERANCE):
        trained = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise MoasError(
            f"{width}x{height} (aspect {width / height:.2f}) is outside the aspect ratios this model was "
            f"trained on ({trained}); ask for a size nearer one of them"
            + ("" if len(sizes) > 1 else ", or train with data.bucketing = true for other shapes")
            + "."
        )
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - target), abs(math.log(s[0] / s[1]))))


def cover_size(base: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The smallest ``base``-aspect size that covers ``target`` (both ``(width, height)``)."""
    scale = max(target[0] / base[0], target[1] / base[1])
    return max(target[0], round(base[0] * scale)), max(target[1], round(base[1] * scale))


def centre_crop(images, width: int, height: int):
    """(…, H, W) → (…, height, width), the middle of the image; a no-op at that size already."""
    h, w = images.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return images[..., top : top + height, left : left + width]
