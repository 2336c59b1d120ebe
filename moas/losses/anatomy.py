"""AnatomicalDetector: the original's three region detectors (face, hands, eyes) used for feature matching.

The detectors are convolutional feature extractors at three receptive-field sizes (k7/s2 with a max-pool,
k5/s2, k3). moas has no labelled anatomy data and no pretrained network, so the detector is a fixed,
seeded random network (random-feature matching: random conv features still separate shapes, strokes and
textures) kept in eval mode and never trained; its weights are rebuilt from the seed, so every run and
every machine compares images with the same features. The loss is 0.5·face + 0.3·hands + 0.2·eyes.
"""

from __future__ import annotations

import torch
from torch import nn

WEIGHTS = {"face": 0.5, "hands": 0.3, "eyes": 0.2}


def _cbr(c_in: int, c_out: int, k: int, stride: int = 1, bn: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, k // 2)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    return layers


class AnatomicalDetector(nn.Module):
    def __init__(self, seed: int = 1234) -> None:
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # the same features everywhere, without touching the caller's RNG stream
        try:
            self.face = nn.Sequential(
                *_cbr(3, 64, 7, 2), nn.MaxPool2d(2), *_cbr(64, 128, 3), *_cbr(128, 256, 3)
            )
            self.hands = nn.Sequential(*_cbr(3, 64, 5, 2), *_cbr(64, 128, 3))
            self.eyes = nn.Sequential(*_cbr(3, 32, 3, bn=False), *_cbr(32, 64, 3, bn=False))
        finally:
            torch.random.set_rng_state(gen_state)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> AnatomicalDetector:
        return super().train(False)  # frozen: BatchNorm always uses its (identity) running statistics

    def feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Spatial features per branch: face (B,256,H/4,W/4), hands (B,128,H/2,W/2), eyes (B,64,H,W)."""
        x = x.float()
        return {"face": self.face(x), "hands": self.hands(x), "eyes": self.eyes(x)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled detector outputs per branch: (B, 256), (B, 128), (B, 64)."""
        return {k: self.pool(v).flatten(1) for k, v in self.feature_maps(x).items()}


def anatomical_loss(pred_maps: dict[str, torch.Tensor], target_maps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Feature matching, per sample: 0.5·face + 0.3·hands + 0.2·eyes, each an L1 between spatial features."""
    total = 0
    for name, w in WEIGHTS.items():
        total = total + w * (pred_maps[name] - target_maps[name]).abs().flatten(1).mean(1)
    return total  # (B,)
