"""Degradations that turn a training image into the enhancer's input: (degraded → original) pairs.

Blur (random Gaussian), downscale (antialiased bicubic by the SR factor), desaturation toward grey and
JPEG-like artefacts (8×8 block DCT with frequency-dependent quantisation, plus mild noise). Every draw
comes from the given ``torch.Generator`` so a seed fixes the pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moas.models.enhance_sr import bicubic


def _dct_matrix(n: int = 8) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float32)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m  # (n, n), orthonormal: m @ m.T = I


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur; ``sigma`` (B,) in pixels (0 = unchanged)."""
    r = 3
    k = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x).clamp_min(1e-3).view(-1, 1)
    g = torch.exp(-(k**2) / (2 * s**2))
    g = g / g.sum(1, keepdim=True)  # (B, 7)
    b, c, h, w = x.shape
    y = x.reshape(1, b * c, h, w)
    gx = g.repeat_interleave(c, 0).view(b * c, 1, 1, 2 * r + 1)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), gx, groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), gx.transpose(-1, -2), groups=b * c)
    return y.view(b, c, h, w)


def jpeg_like(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Blockwise DCT quantisation; ``quality`` (B,) in (0, 1], lower = coarser steps on high frequencies."""
    b, c, h, w = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    y = F.pad(x, (0, pw, 0, ph), mode="replicate")
    H, W = y.shape[-2:]
    d = _dct_matrix().to(x)
    blocks = y.view(b, c, H // 8, 8, W // 8, 8).permute(0, 1, 2, 4, 3, 5)  # (B, C, h/8, w/8, 8, 8)
    coef = d @ blocks @ d.T
    freq = torch.arange(8, device=x.device, dtype=x.dtype)
    step = 0.02 * (1 + freq[:, None] + freq[None, :])  # (8, 8): coarser at high frequency
    step = step / quality.to(x).view(b, 1, 1, 1, 1, 1)
    coef = torch.round(coef / step) * step
    out = (d.T @ coef @ d).permute(0, 1, 2, 4, 3, 5).reshape(b, c, H, W)
    return out[..., :h, :w]


def degrade(hr: torch.Tensor, factor: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → (B, 3, H/factor, W/factor): blurred, downscaled, desaturated, JPEG-like."""
    b = hr.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    x = gaussian_blur(hr.float(), u(0.0, 1.0))
    h, w = hr.shape[-2:]
    x = bicubic(x, (max(1, h // factor), max(1, w // factor)))
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * (1 - u(0.0, 0.3).to(x).view(b, 1, 1, 1))
    x = jpeg_like(x, u(0.3, 1.0))
    noise = torch.randn(x.shape, generator=generator).to(x) * u(0.0, 0.03).to(x).view(b, 1, 1, 1)
    return (x + noise).clamp(-1, 1)
