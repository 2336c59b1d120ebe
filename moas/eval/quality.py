"""The quality expert: a reference-free quality score for generated images, and sample diversity.

``quality_score`` rates each image in [0, 1] (higher = better) as the mean of four measurements, each
mapped to [0, 1]:

* exposure: the Mertens et al. (2007) well-exposedness of the luminance, mean exp(−(L − 0.5)² / 0.08);
* contrast: the luminance standard deviation relative to 0.25 (a full-range image), capped at 1;
* colourfulness: Hasler & Süsstrunk (2003) M on 0–255 RGB, mapped by tanh(M / 60) (M ≈ 59 is
  "quite colourful" on their scale);
* clean detail: edge energy at half resolution (structure) times exp(−σ/0.05), where σ is the pixel-noise
  estimate of Immerkær (1996) at full resolution; sampler noise raises σ but little structure.

``creativity`` is the mean pairwise distance between images of one prompt drawn with different seeds:
the RMS difference of 8×8 downsampled RGB (layout and colour masses), in [0, 1]; 0 means every seed drew
the same picture.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moas.eval.metrics import luminance, sobel

QUALITY_PARTS = ("exposure", "contrast", "colorfulness", "clean_detail")


def _unit_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) or float in [-1, 1] → float [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return (images.float().clamp(-1, 1) + 1) / 2


def noise_sigma(gray: torch.Tensor) -> torch.Tensor:
    """Immerkær's fast noise-σ estimate of (B, 1, H, W) in [0, 1] → (B,)."""
    k = torch.tensor([[1.0, -2, 1], [-2, 4, -2], [1, -2, 1]], device=gray.device).view(1, 1, 3, 3)
    r = F.conv2d(gray, k).abs()  # (B, 1, H-2, W-2)
    return r.mean((1, 2, 3)) * math.sqrt(math.pi / 2) / 6


@torch.no_grad()
def quality_parts(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four quality measurements of each image, each (B,) in [0, 1]."""
    x = _unit_images(images)  # (B, 3, H, W)
    lum = luminance(x)  # (B, 1, H, W)
    exposure = torch.exp(-((lum - 0.5) ** 2) / 0.08).mean((1, 2, 3))
    contrast = (lum.flatten(1).std(1) / 0.25).clamp(max=1.0)
    rgb = x * 255.0
    rg = rgb[:, 0] - rgb[:, 1]
    yb = 0.5 * (rgb[:, 0] + rgb[:, 1]) - rgb[:, 2]
    m = torch.hypot(rg.flatten(1).std(1), yb.flatten(1).std(1)) + 0.3 * torch.hypot(
        rg.flatten(1).mean(1), yb.flatten(1).mean(1)
    )
    colorfulness = torch.tanh(m / 60.0)
    half = F.avg_pool2d(lum, 2) if min(lum.shape[-2:]) >= 8 else lum
    structure = (torch.hypot(*sobel(half)).mean((1, 2, 3)) / 0.1).clamp(max=1.0)
    sigma = noise_sigma(lum) if min(lum.shape[-2:]) >= 3 else torch.zeros(len(x), device=x.device)
    clean_detail = structure * torch.exp(-sigma / 0.05)
    return {
        "exposure": exposure,
        "contrast": contrast,
        "colorfulness": colorfulness,
        "clean_detail": clean_detail,
    }


@torch.no_grad()
def quality_score(images: torch.Tensor) -> torch.Tensor:
    """Quality of each image, (B,) in [0, 1]: the mean of :func:`quality_parts`."""
    parts = quality_parts(images)
    return torch.stack([parts[k] for k in QUALITY_PARTS], 1).mean(1)


@torch.no_grad()
def creativity(images: torch.Tensor) -> float:
    """Mean pairwise RMS distance of 8×8 thumbnails of images of one prompt (different seeds), in [0, 1]."""
    if len(images) < 2:
        raise ValueError("creativity needs at least two images")
    x = _unit_images(images)
    thumbs = F.adaptive_avg_pool2d(x, 8).flatten(1)  # (B, 192)
    d = torch.cdist(thumbs, thumbs) / math.sqrt(thumbs.shape[1])  # (B, B) RMS differences
    n = len(images)
    return float(d.sum() / (n * (n - 1)))
