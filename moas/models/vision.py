"""VisionEncoder: a 4-layer CNN → 512 → embedding / structure / colour / composition heads.

As in the original it is used only at inference, on an image the caller provides, where the device is
controlled — never inside DataLoader workers (training batches use pixel statistics instead).

``norm="group"`` replaces BatchNorm with GroupNorm: the panel memory (``moas.models.panel_memory``) encodes a
handful of images per step, often one, down to 1×1 feature maps, where batch statistics are undefined,
and it must behave the same in training and at generation.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class VisionEncoder(nn.Module):
    """images [B,3,H,W] in [-1,1] → embedding [B,768], structure/color/composition [B,128]."""

    def __init__(
        self,
        channels: tuple[int, ...] = (64, 128, 256, 512),
        out_dim: int = 768,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError("norm must be 'batch' or 'group'")
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            n = nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(math.gcd(8, c), c)
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), n, nn.ReLU()]
            c_in = c
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 512)
        f = channels[-1]
        self.embedding = nn.Sequential(
            nn.Linear(f, out_dim), nn.LayerNorm(out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim)
        )
        self.structure = nn.Sequential(nn.Linear(f, 256), nn.ReLU(), nn.Linear(256, 128))
        self.color = nn.Sequential(nn.Linear(f, 256), nn.ReLU(), nn.Linear(256, 128))
        self.composition = nn.Sequential(nn.Linear(f, 256), nn.ReLU(), nn.Linear(256, 128))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.backbone(images.to(self.embedding[0].weight.device))  # (B, 512)
        return {
            "embedding": self.embedding(feat),
            "structure": self.structure(feat),
            "color": self.color(feat),
            "composition": self.composition(feat),
        }
