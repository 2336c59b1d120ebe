"""Aspect-ratio buckets: area-preserving training sizes, and the nearest bucket for an image.

Buckets have about ``resolution²`` pixels. Sides step by 64 px for resolutions of 256 and more; for
smaller resolutions (the 32-px demo, 16-px tests) the step is ``resolution / 4`` rounded to a multiple of
8 (at least 8). Every side is also a multiple of ``divisor`` (the U-Net's ``patch_size * 2**(levels-1)``);
the step is raised to the least common multiple of the two. Images go to the bucket with the nearest log
aspect ratio, so no image is ever dropped; ``max_aspect`` bounds how elongated a bucket may be.
"""

from __future__ import annotations

import math


def bucket_step(resolution: int, divisor: int = 1) -> int:
    step = 64 if resolution >= 256 else max(8, round(resolution / 4 / 8) * 8)
    return step * divisor // math.gcd(step, divisor)


def make_buckets(resolution: int, divisor: int = 1, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Sorted ``(width, height)`` buckets with area ≤ resolution², always including the square."""
    step = bucket_step(resolution, divisor)
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of the bucket step {step}")
    area = resolution * resolution
    out = {(resolution, resolution)}
    w = step
    while w <= resolution * max_aspect:
        h = (area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_aspect:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose log aspect ratio is nearest the image's (ties → the first)."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - target))
