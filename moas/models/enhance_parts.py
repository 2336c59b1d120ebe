"""The QualityEnhancer's stages: AdvancedDetailEnhancer, ColorVibrancySystem, MultiScaleProcessor.

Layer widths follow the original with ``width`` standing for its 128 (and ``2·width`` for its 256); the
``cpu_tiny`` profile uses a smaller width. Every stage adds learned residuals whose last layer is
zero-initialised, so an untrained stage returns its input exactly. Images are (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def zero_last(seq: nn.Sequential) -> nn.Sequential:
    last = [m for m in seq.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
    nn.init.zeros_(last.weight)
    if last.bias is not None:
        nn.init.zeros_(last.bias)
    return seq


def conv_stack(channels: list[int], k: int = 3, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Conv(k)→act between each consecutive pair of widths; no activation after the last conv."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
        layers.append(nn.Conv2d(a, b, k, 1, k // 2))
        if i < len(channels) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class AdvancedDetailEnhancer(nn.Module):
    """Fine/medium/coarse detail branches (3×3/5×5/7×7) fused, plus edge and texture residuals."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        w = width
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3, w, k, 1, k // 2), nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, w, k, 1, k // 2)
            )
            for k in (3, 5, 7)
        )
        # 1×1 fusion: it mixes the three branches' channels; the branches already carry the spatial context.
        self.detail_fusion = zero_last(conv_stack([3 * w, 2 * w, 2 * w, w], k=1))
        self.edge_enhancer = zero_last(nn.Sequential(nn.Conv2d(3, 3, 3, 1, 1)))
        self.texture_enhancer = zero_last(nn.Sequential(nn.Conv2d(3, 3, 3, 1, 1)))
        self.final_enhancer = zero_last(conv_stack([3, 2 * w, 2 * w, w, 3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.detail_fusion(torch.cat([b(x) for b in self.branches], 1))  # (B, w, H, W)
        combined = (
            x
            + 0.3 * fused.mean(1, keepdim=True)
            + 0.2 * self.edge_enhancer(x)
            + 0.2 * self.texture_enhancer(x)
        )
        return combined + 0.4 * self.final_enhancer(combined)


class ColorVibrancySystem(nn.Module):
    """Decoupled saturation / contrast / brightness (Tanh branches), colour harmony, final colour residual."""

    def __init__(self, width: int = 128, vibrancy_strength: float = 0.3) -> None:
        super().__init__()
        w = width
        self.strength = vibrancy_strength
        self.color_analysis = nn.Sequential(
            conv_stack([3, w, 2 * w, w]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.saturation = zero_last(nn.Sequential(nn.Linear(w, 1)))
        self.contrast = zero_last(nn.Sequential(nn.Linear(w, 1)))
        self.brightness = zero_last(nn.Sequential(nn.Linear(w, 1)))
        self.color_harmony = zero_last(conv_stack([3, w, 2 * w, 3]))
        self.color_enhancement = zero_last(conv_stack([3, 2 * w, 2 * w, w, 3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.color_analysis(x)  # (B, w)
        s = torch.tanh(self.saturation(f)).view(-1, 1, 1, 1) * self.strength
        c = torch.tanh(self.contrast(f)).view(-1, 1, 1, 1) * 0.5 * self.strength
        b = torch.tanh(self.brightness(f)).view(-1, 1, 1, 1) * 0.3 * self.strength
        grey = x.mean(1, keepdim=True)  # (B, 1, H, W)
        # Written as additions so that zero adjustments return the input bit for bit.
        y = x + (x - grey) * s  # saturation about the pixel's grey
        mean = y.mean((1, 2, 3), keepdim=True)
        y = y + (y - mean) * c + b  # contrast about the image mean, then brightness
        y = y + self.color_harmony(y)
        return y + 0.4 * self.color_enhancement(y)


class MultiScaleProcessor(nn.Module):
    """Branches at full, ½ and ¼ resolution (3×3/5×5/7×7), fused at full resolution; image + 0.5·output."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        w = width
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3, w, k, 1, k // 2), nn.ReLU(), nn.Conv2d(w, w, k, 1, k // 2))
            for k in (3, 5, 7)
        )
        self.scale_fusion = nn.Sequential(conv_stack([3 * w, 2 * w, 2 * w, w], k=1), nn.ReLU())
        self.output_generator = zero_last(conv_stack([w, 2 * w, 2 * w, 3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        outs = []
        for i, branch in enumerate(self.branches):
            xi = x if i == 0 else F.interpolate(x, scale_factor=0.5**i, mode="bilinear", antialias=True)
            yi = branch(xi)  # (B, w, H/2^i, W/2^i)
            outs.append(
                yi if i == 0 else F.interpolate(yi, size=(h, w), mode="bilinear", align_corners=False)
            )
        return x + 0.5 * self.output_generator(self.scale_fusion(torch.cat(outs, 1)))
