"""DesignStyleSupportSystem: a style fingerprint becomes one extra cross-attention context token.

Registered on the ConditioningEncoder's DataFlow as stage ``style`` (inputs ``style`` [B, S] and
``style_mask`` [B] bool; outputs ``extra_context`` [B, 1, 768] and ``extra_context_mask`` [B, 1]), so the
U-Net attends to the artist's fingerprint next to the text. The output layer is zero-initialised: a new
model behaves exactly as without style until training teaches it otherwise. Rows without a style
(``style_mask`` False, e.g. generation without ``--style`` or the 10 % style dropout in training) are
masked out of attention. The original places this module on the CPU; here it is tiny (≈0.6 M parameters)
and lives on the model's device so no tensor crosses devices in the step.
"""

from __future__ import annotations

import torch
from torch import nn

from moas.models.conditioning import CONTEXT_DIM


class DesignStyleSupportSystem(nn.Module):
    def __init__(self, style_dim: int, dim: int = CONTEXT_DIM) -> None:
        super().__init__()
        self.style_dim = style_dim
        self.norm = nn.LayerNorm(style_dim)  # fingerprint features differ in scale
        self.net = nn.Sequential(nn.Linear(style_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, style: torch.Tensor, style_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        token = self.net(self.norm(style.float())).unsqueeze(1)  # (B, 1, 768)
        return {"extra_context": token, "extra_context_mask": style_mask.bool().reshape(-1, 1)}  # (B, 1)
