"""AdvancedCompressionSystem: importance-weighted 768→384 embedding compression with 8-bit inference.

Used on the VRAM-critical path when ``brain.compression`` is on: the pooled text vector passes through
compress → (8-bit quantise, inference only) → decompress before the brain reads it, and training adds the
reconstruction loss ``mse(decompressed, original)``. The original places it on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row 8-bit quantisation: scale = abs_max / 127, round(x / scale) · scale.

    The error per element is at most scale / 2 = abs_max / 254.
    """
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0  # (B, 1)
    return torch.round(x / scale).clamp(-127, 127) * scale


class AdvancedCompressionSystem(nn.Module):
    """embedding [B,768] → compressed [B,384] → reconstructed [B,768] (+ reconstruction loss)."""

    def __init__(self, dim: int = 768, ratio: float = 0.5, hidden: int = 1536) -> None:
        super().__init__()
        c = int(dim * ratio)
        self.compressed_dim = c
        self.importance_net = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.ReLU(), nn.Linear(dim // 2, dim), nn.Sigmoid()
        )
        self.compressor = nn.Sequential(
            nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, dim), nn.LayerNorm(dim), nn.GELU(),
            nn.Linear(dim, c),
        )  # fmt: skip
        self.decompressor = nn.Sequential(
            nn.Linear(c, dim), nn.LayerNorm(dim), nn.GELU(),
            nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, dim),
        )  # fmt: skip

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        z = self.compressor(x * self.importance_net(x))  # (B, 384)
        return z if self.training else quantize_8bit(z)

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        device = pooled.device
        x = pooled.to(self.decompressor[0].weight.device)  # may live on the CPU (original placement)
        rec = self.decompressor(self.compress(x))  # (B, 768)
        loss = F.mse_loss(rec, x)
        return {"pooled_compressed": rec.to(device), "compression_loss": loss.to(device)}
