"""SuperResolutionSystem: the original's 8-block residual SRGAN generator with PixelShuffle ×2 / ×4.

feature_extractor Conv(3→64)→PReLU→Conv(64→64)→PReLU; 8 × [Conv→BN→PReLU→Conv→BN + residual];
upsampler Conv(64→256)→PixelShuffle(2)→PReLU, a second such stage for ×4; reconstructor
Conv(64→64)→PReLU→Conv(64→3). moas predicts a residual over bicubic upscaling and zero-initialises the
last convolution, so an untrained system is exactly bicubic upscaling; when the PixelShuffle output does
not have the requested size, the residual is resized to it (the original's bicubic fallback).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=down)


class ResidualBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1),
            nn.BatchNorm2d(c),
            nn.PReLU(c),
            nn.Conv2d(c, c, 3, 1, 1),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _upsampler(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, 4 * c, 3, 1, 1), nn.PixelShuffle(2), nn.PReLU(c))


class SuperResolutionSystem(nn.Module):
    def __init__(self, channels: int = 64, num_blocks: int = 8) -> None:
        super().__init__()
        c = channels
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(3, c, 3, 1, 1), nn.PReLU(c), nn.Conv2d(c, c, 3, 1, 1), nn.PReLU(c)
        )
        self.residual_blocks = nn.Sequential(*[ResidualBlock(c) for _ in range(num_blocks)])
        self.up2 = _upsampler(c)
        self.up4 = _upsampler(c)  # the second stage, used for ×4
        self.reconstructor = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.PReLU(c), nn.Conv2d(c, 3, 3, 1, 1))
        nn.init.zeros_(self.reconstructor[-1].weight)  # untrained = bicubic exactly
        nn.init.zeros_(self.reconstructor[-1].bias)

    def forward(self, x: torch.Tensor, scale: int = 2, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Upscale (B, 3, H, W) in [-1, 1] by ``scale`` (2 or 4), or to ``size`` (H', W') through that head."""
        if scale not in (2, 4):
            raise ValueError("SuperResolutionSystem scale must be 2 or 4")
        h, w = x.shape[-2:]
        size = size or (h * scale, w * scale)
        feats = self.feature_extractor(x)  # (B, C, H, W)
        feats = feats + self.residual_blocks(feats)
        up = self.up2(feats)  # (B, C, 2H, 2W)
        if scale == 4:
            up = self.up4(up)  # (B, C, 4H, 4W)
        residual = bicubic(self.reconstructor(up), size)  # the bicubic fallback when shapes differ
        return bicubic(x, size) + residual
