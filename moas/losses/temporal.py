"""Temporal-consistency loss between consecutive panels (the original's panel-generation loss).

The original gives only the combination::

    0.5 × feature_consistency + character_weight × character_consistency + scene_weight × scene_consistency

and not what the three terms measure. moas uses differentiable, parameter-free image descriptors — no
pretrained network, since none may be downloaded and every image network here starts from scratch:

``feature``    1 − cosine similarity of colour + Sobel-edge feature maps average-pooled to 2×2, 4×4 and
               8×8 (the coarse layout and line structure of the whole panel), averaged over the scales.
``character``  the colour distribution of the central region (the middle half of each side, where the
               character of a panel usually stands): per-channel mean, standard deviation and an 8-bin
               soft histogram. Same hair / skin / clothes colours → low, whatever the pose.
``scene``      the same colour distribution over the border region (everything outside the centre: the
               background) plus the L1 distance of the 12 outer cells of a 4×4 average-pooled layout.

Images are in [-1, 1], (B, 3, H, W). Each term is per sample, about 0 for identical panels and of order
0.1–1 for unrelated ones. ``TemporalConsistencyLoss`` weights and sums them with the loss stack's NaN/Inf
guard (a non-finite term is dropped from the batch, a finite one clamped at ``term_clamp``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moas.losses.image import sobel_magnitude
from moas.losses.stack import LossResult, guarded_sum

FEATURE_WEIGHT = 0.5  # the original's fixed 0.5
SCALES = (2, 4, 8)
BINS = 8
TERMS = ("feature", "character", "scene")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x.float() + 1) * 0.5  # [-1, 1] → [0, 1]


def centre_mask(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, 1, H, W) float: 1 inside the central box (the middle half of each side), 0 on the border."""
    m = torch.zeros(1, 1, h, w, device=device)
    m[..., h // 4 : h - h // 4, w // 4 : w - w // 4] = 1.0
    return m


def feature_consistency(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 − cos of multi-scale pooled colour + edge maps, (B,)."""
    fa = torch.cat([_unit(a), sobel_magnitude(a)], 1)  # (B, 4, H, W)
    fb = torch.cat([_unit(b), sobel_magnitude(b)], 1)
    size = min(a.shape[-2:])
    out = []
    for s in [s for s in SCALES if s <= size] or [1]:
        pa = F.adaptive_avg_pool2d(fa, s).flatten(1) - 0.5  # centred so mid-grey is no direction
        pb = F.adaptive_avg_pool2d(fb, s).flatten(1) - 0.5
        out.append(1 - F.cosine_similarity(pa, pb, dim=1, eps=1e-6))
    return torch.stack(out).mean(0)


def colour_stats(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Weighted per-channel mean (B,3), std (B,3) and soft histogram (B,3,BINS) of ``x`` in [0, 1]."""
    wsum = weight.flatten(2).sum(-1).clamp_min(1e-6)  # (B or 1, 1)
    mean = (x * weight).flatten(2).sum(-1) / wsum  # (B, 3)
    var = ((x - mean[..., None, None]) ** 2 * weight).flatten(2).sum(-1) / wsum
    std = torch.sqrt(var + 1e-6)
    centres = (torch.arange(BINS, device=x.device, dtype=x.dtype) + 0.5) / BINS
    k = torch.exp(-((x.unsqueeze(2) - centres.view(1, 1, BINS, 1, 1)) ** 2) * (2.0 * BINS * BINS))
    k = k / k.sum(2, keepdim=True).clamp_min(1e-8)  # (B, 3, BINS, H, W): each pixel spreads one unit
    hist = (k * weight.unsqueeze(2)).flatten(3).sum(-1) / wsum.unsqueeze(-1)  # (B, 3, BINS)
    return mean, std, hist


def _distribution_distance(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    ma, sa, ha = colour_stats(_unit(a), weight)
    mb, sb, hb = colour_stats(_unit(b), weight)
    tv = 0.5 * (ha - hb).abs().sum(-1)  # total variation of each channel's histogram, in [0, 1]
    return ((ma - mb).abs() + (sa - sb).abs() + tv).mean(1)  # (B,)


def character_consistency(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample colour-distribution distance inside the central region, (B,)."""
    return _distribution_distance(a, b, centre_mask(*a.shape[-2:], device=a.device))


def scene_consistency(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample colour-distribution distance of the border region + its low-resolution layout, (B,)."""
    border = 1 - centre_mask(*a.shape[-2:], device=a.device)
    dist = _distribution_distance(a, b, border)
    la = F.adaptive_avg_pool2d(_unit(a), 4)  # (B, 3, 4, 4); its middle 2×2 cells are the centre box
    lb = F.adaptive_avg_pool2d(_unit(b), 4)
    outer = 1 - centre_mask(4, 4, device=a.device)
    layout = ((la - lb).abs() * outer).flatten(1).sum(1) / (3 * outer.sum())
    return dist + layout


def temporal_terms(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unweighted per-sample terms (B,) between panels ``a`` and ``b`` (both (B, 3, H, W) in [-1, 1])."""
    a, b = a.float(), b.float()
    return {
        "feature": feature_consistency(a, b),
        "character": character_consistency(a, b),
        "scene": scene_consistency(a, b),
    }


class TemporalConsistencyLoss(nn.Module):
    """0.5·feature + character_weight·character + scene_weight·scene, guarded like the loss stack."""

    def __init__(
        self, character_weight: float = 0.3, scene_weight: float = 0.2, term_clamp: float = 50.0
    ) -> None:
        super().__init__()
        self.weights = {"feature": FEATURE_WEIGHT, "character": character_weight, "scene": scene_weight}
        self.term_clamp = term_clamp

    def per_sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Weighted per-sample total (B,) — the metric reported at generation."""
        terms = temporal_terms(a, b)
        return sum(self.weights[k] * v for k, v in terms.items())

    def forward(
        self, pred: torch.Tensor, previous: torch.Tensor, sample_weight: torch.Tensor | None = None
    ) -> LossResult:
        """Batch loss: Σ_terms w_term · mean_b(sample_weight_b · term_b). Samples that have no previous
        panel get sample_weight 0 (the mean still divides by the whole batch, like the domain losses)."""
        per = temporal_terms(pred, previous)
        return guarded_sum(per, self.weights, self.term_clamp, sample_weight, "Temporal loss term")


def sequence_metrics(panels: torch.Tensor, character_weight: float = 0.3, scene_weight: float = 0.2) -> dict:
    """Temporal consistency of consecutive panels (N, 3, H, W) in [-1, 1]: per pair and the mean.

    Lower is more consistent (0 = identical panels)."""
    loss = TemporalConsistencyLoss(character_weight, scene_weight)
    pairs = []
    if panels.shape[0] >= 2:
        a, b = panels[1:].float(), panels[:-1].float()
        terms = temporal_terms(a, b)
        total = loss.per_sample(a, b)
        for k in range(a.shape[0]):
            row = {"pair": [k, k + 1], "temporal_consistency": float(total[k])}
            row |= {name: float(v[k]) for name, v in terms.items()}
            pairs.append(row)
    keys = ("temporal_consistency", *TERMS)
    mean = {k: sum(p[k] for p in pairs) / len(pairs) for k in keys} if pairs else {}
    return {
        "weights": dict(loss.weights),
        "pairs": pairs,
        "mean": mean,
    }
