"""AdvancedLossFunctions: the original's composite loss stack with a per-term NaN/Inf guard.

Terms (each a per-sample value, weighted, summed): ``pixel`` (combined L1 / 0.5·MSE + 0.5·L1), ``ssim``
(1 − SSIM), ``line_art`` (Sobel edges + Laplacian thickness), ``color`` (colour distribution), ``style``
(Gram matrices of the anatomical detector's features, weight 0.2), ``anatomy`` (feature matching,
0.5·face + 0.3·hands + 0.2·eyes), ``perceptual`` (VGG16, only with local pretrained weights) and ``gan``
(BCE against the discriminator with label smoothing). A term that comes out NaN/Inf is dropped from the
total for that batch and reported in ``LossResult.bad``; each finite term is clamped at ``term_clamp``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from moas.losses.anatomy import AnatomicalDetector, anatomical_loss
from moas.losses.gan import generator_gan_loss
from moas.losses.image import color_harmony_loss, combined_loss, gram_loss, line_art_loss, ssim_loss
from moas.losses.perceptual import load_vgg_perceptual

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = {
    "pixel": 1.0,
    "ssim": 0.2,
    "line_art": 0.2,
    "color": 0.1,
    "style": 0.2,  # the original's style-consistency weight
    "anatomy": 0.1,
    "perceptual": 0.1,
    "gan": 0.01,
}
TERMS = tuple(DEFAULT_WEIGHTS)


@dataclass
class LossResult:
    total: torch.Tensor  # scalar, differentiable
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted, detached scalars per term
    bad: list[str] = field(default_factory=list)  # terms dropped by the NaN/Inf guard this call

    def scalars(self, prefix: str = "loss/") -> dict[str, float]:
        return {prefix + k: float(v) for k, v in self.terms.items()}


def guarded_sum(
    per: dict[str, torch.Tensor],
    weights: dict[str, float],
    term_clamp: float,
    sample_weight: torch.Tensor | None = None,
    what: str = "Loss term",
) -> LossResult:
    """Σ_terms weight · mean_b(sample_weight_b · term_b), each term clamped at ``term_clamp``.

    The NaN/Inf guard: a term that is not finite is dropped from this batch (with a warning), so a poisoned
    term never reaches backward. The mean divides by the whole batch (unnormalised weights: a batch whose
    samples are mostly weighted down counts less)."""
    total = None
    terms, bad = {}, []
    for name, values in per.items():
        sw = torch.ones_like(values) if sample_weight is None else sample_weight.to(values)
        value = weights[name] * (values * sw).mean()
        if not torch.isfinite(value):
            bad.append(name)
            log.warning("%s %s is not finite; dropped from this batch.", what, name)
            continue
        value = value.clamp(max=term_clamp)
        terms[name] = value.detach()
        total = value if total is None else total + value
    if total is None:
        ref = next(iter(per.values()), torch.zeros(()))
        total = ref.new_zeros((), dtype=torch.float32)
    return LossResult(total, terms, bad)


class AdvancedLossFunctions(nn.Module):
    def __init__(
        self,
        weights: dict[str, float] | None = None,
        mixed_precision: bool = False,
        mse_weight: float = 0.5,
        l1_weight: float = 0.5,
        vgg_weights: str | None = None,
        term_clamp: float = 50.0,
    ) -> None:
        super().__init__()
        w = dict(DEFAULT_WEIGHTS)
        w.update(weights or {})
        unknown = set(w) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms: {sorted(unknown)}")
        self.weights = w
        self.mixed_precision = mixed_precision
        self.mse_weight, self.l1_weight = mse_weight, l1_weight
        self.term_clamp = term_clamp
        need_features = w["style"] > 0 or w["anatomy"] > 0
        self.detector = AnatomicalDetector() if need_features else None
        self.vgg = load_vgg_perceptual(vgg_weights) if w["perceptual"] > 0 else None
        if self.vgg is None:
            self.weights["perceptual"] = 0.0

    @property
    def active(self) -> list[str]:
        return [k for k, v in self.weights.items() if v > 0]

    def per_sample_terms(
        self, pred: torch.Tensor, target: torch.Tensor, fake_prob: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Unweighted per-sample values (B,) of every active term. Images in [-1, 1], (B, 3, H, W)."""
        w = self.weights
        pred, target = pred.float(), target.float()
        out: dict[str, torch.Tensor] = {}
        if w["pixel"] > 0:
            out["pixel"] = combined_loss(pred, target, self.mixed_precision, self.mse_weight, self.l1_weight)
        if w["ssim"] > 0:
            out["ssim"] = ssim_loss(pred, target)
        if w["line_art"] > 0:
            out["line_art"] = line_art_loss(pred, target)
        if w["color"] > 0:
            out["color"] = color_harmony_loss(pred, target)
        if self.detector is not None:
            pm = self.detector.feature_maps(pred)
            with torch.no_grad():
                tm = self.detector.feature_maps(target)
            if w["anatomy"] > 0:
                out["anatomy"] = anatomical_loss(pm, tm)
            if w["style"] > 0:
                out["style"] = gram_loss(list(pm.values()), list(tm.values()))
        if self.vgg is not None and w["perceptual"] > 0:
            out["perceptual"] = self.vgg(pred, target)
        if fake_prob is not None and w["gan"] > 0:
            out["gan"] = generator_gan_loss(fake_prob)
        return out

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
        fake_prob: torch.Tensor | None = None,
    ) -> LossResult:
        """Weighted total; ``sample_weight`` (B,) multiplies each sample's terms (e.g. to favour low noise)."""
        per = self.per_sample_terms(pred, target, fake_prob)
        return self.combine(per, sample_weight)

    def combine(self, per: dict[str, torch.Tensor], sample_weight: torch.Tensor | None = None) -> LossResult:
        return guarded_sum(per, self.weights, self.term_clamp, sample_weight)
