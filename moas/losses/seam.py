"""Seam quality of inpainting/outpainting: the original's overlap loss and Sobel attention-edge loss.

Both compare the model's raw output with the reference inside the *overlap zone*: kept pixels within
``band`` (32) px of the generated region — for outpainting, the 32-px border strips along each extended
side. Low values mean the generated content continues the kept image across the seam. Combined as the
original: 0.2·overlap + 0.1·attention_edge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moas.losses.image import sobel_magnitude


def overlap_zone(mask: torch.Tensor, band: int = 32) -> torch.Tensor:
    """Kept pixels (mask 0) within ``band`` px of a generated pixel (mask 1): (B, 1, H, W) float."""
    near = F.max_pool2d(mask.float(), 2 * band + 1, stride=1, padding=band)
    return near * (1 - mask.float())


def overlap_loss(generated: torch.Tensor, reference: torch.Tensor, zone: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between generated and reference inside the overlap zone, (B,)."""
    err = (generated.float() - reference.float()).square().mean(1, keepdim=True)  # (B, 1, H, W)
    return (err * zone).flatten(1).sum(1) / zone.flatten(1).sum(1).clamp_min(1)


def attention_edge_loss(generated: torch.Tensor, reference: torch.Tensor, zone: torch.Tensor) -> torch.Tensor:
    """Per-sample edge misalignment, weighted by the reference's Sobel magnitude (its edges attract attention)."""
    g, r = sobel_magnitude(generated), sobel_magnitude(reference)  # (B, 1, H, W)
    attn = r * zone
    attn = attn / attn.flatten(1).sum(1).clamp_min(1e-8).view(-1, 1, 1, 1)
    return (attn * (g - r).abs()).flatten(1).sum(1)


def seam_metrics(
    generated: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, band: int = 32
) -> dict[str, float]:
    """Batch means of the overlap MSE, attention-edge loss and their combination 0.2·o + 0.1·e."""
    zone = overlap_zone(mask, band)
    o = overlap_loss(generated, reference, zone).mean().item()
    e = attention_edge_loss(generated, reference, zone).mean().item()
    return {"overlap_mse": o, "attention_edge": e, "seam_loss": 0.2 * o + 0.1 * e}
