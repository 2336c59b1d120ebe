"""Memorisation: does a generated image copy a training image?

The rule of Gu et al. (2025, "On Memorization in Diffusion Models", after Yoon et al. 2023): a generated
sample is memorised when its distance to the nearest training sample is less than a third of its distance to
the second nearest, d₁ / d₂ < 1/3. The ratio, not the raw distance, is what makes the rule scale-free: a copy
sits far closer to one training image than to any other, while a new image of a common kind sits at similar
distances from many.

moas applies it in two spaces and reports both and their union: the folder tag model's pooled features
(:mod:`moas.eval.tagger`; catches copies of content and layout) and small downscaled pixels (16×16 RGB,
L2; catches near-exact copies whatever the features do).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moas.eval.tag_model import resize_images

THRESHOLD = 1 / 3
PIXEL_SIZE = 16


def nearest_ratio(gen_feats: torch.Tensor, train_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d(nearest) / d(second nearest) training sample per generated sample, and the nearest's index.

    (G, F), (N, F) → ratios (G,) float64, indices (G,) int64. A sample that equals two identical training
    samples has 0 / 0, taken as 0 (a copy). Needs N >= 2.
    """
    if len(train_feats) < 2:
        raise ValueError(
            f"The memorisation test needs at least 2 training images (it compares the nearest with the "
            f"second nearest), got {len(train_feats)}."
        )
    d = torch.cdist(gen_feats.double(), train_feats.double())  # (G, N)
    two = d.topk(2, dim=1, largest=False)  # ascending: nearest first
    d1, d2 = two.values[:, 0], two.values[:, 1]
    ratio = torch.where(d2 > 0, d1 / d2.clamp(min=1e-300), torch.zeros_like(d1))  # d2 = 0 implies d1 = 0
    return ratio, two.indices[:, 0]


def memorised(
    gen_feats: torch.Tensor, train_feats: torch.Tensor, threshold: float = THRESHOLD
) -> torch.Tensor:
    """Bool (G,): generated samples whose nearest-to-second-nearest distance ratio is below ``threshold``."""
    return nearest_ratio(gen_feats, train_feats)[0] < threshold


def pixel_vectors(
    images_uint8: torch.Tensor | Sequence[torch.Tensor], size: int = PIXEL_SIZE
) -> torch.Tensor:
    """uint8 images of any size → (B, 3·size²) float in [0, 1], downscaled (antialiased) to size × size."""
    return resize_images(images_uint8, size).flatten(1).float() / 255.0


def _space(ratio: torch.Tensor, threshold: float) -> dict:
    flags = ratio < threshold
    return {
        "rate": round(float(flags.float().mean()), 4),
        "count": int(flags.sum()),
        "median_ratio": round(float(ratio.median()), 4),
        "min_ratio": round(float(ratio.min()), 4),
    }


def memorisation_report(
    gen_uint8: torch.Tensor | Sequence[torch.Tensor],
    train_uint8: torch.Tensor | Sequence[torch.Tensor],
    gen_feats: torch.Tensor,
    train_feats: torch.Tensor,
    threshold: float = THRESHOLD,
    pixel_size: int = PIXEL_SIZE,
) -> dict:
    """Memorisation rates of G generated images against N training images in tag-model features, in
    ``pixel_size``² pixels, and flagged by either; indices of each generated image's nearest training image
    (positions in ``train_uint8``) in both spaces and the generated images flagged. Images may differ in size.
    """
    if len(gen_uint8) != len(gen_feats) or len(train_uint8) != len(train_feats):
        raise ValueError("each image set needs one feature row per image")
    if len(gen_uint8) == 0:
        raise ValueError("The memorisation test needs at least one generated image.")
    f_ratio, f_near = nearest_ratio(gen_feats, train_feats)
    p_ratio, p_near = nearest_ratio(
        pixel_vectors(gen_uint8, pixel_size), pixel_vectors(train_uint8, pixel_size)
    )
    either = (f_ratio < threshold) | (p_ratio < threshold)
    return {
        "threshold": threshold,
        "n_generated": len(gen_feats),
        "n_train": len(train_feats),
        "features": _space(f_ratio, threshold),
        "pixels": {**_space(p_ratio, threshold), "size": pixel_size},
        "combined": {"rate": round(float(either.float().mean()), 4), "count": int(either.sum())},
        "nearest_features": f_near.tolist(),
        "nearest_pixels": p_near.tolist(),
        "flagged": either.nonzero().flatten().tolist(),
    }
