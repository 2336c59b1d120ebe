"""PanelMemory: the previous panels of a sequence → memory tokens for the MoE's "memory" expert.

The original lists a *memory* expert ("temporal consistency across panels and sequences") but says
nothing of what it remembers. Here it remembers pictures: each previous panel [3,H,W] goes through a
VisionEncoder (GroupNorm, see ``moas.models.vision``), its 768-d embedding and its structure / colour /
composition heads (128-d each) are concatenated, LayerNorm'd and projected to the expert width, and a
learned embedding of the panel's distance back in the sequence (1 = the panel just before) is added, so
the expert can weigh recent panels differently. ``BatchedExperts`` then lets the memory expert attend to
these tokens through a zero-initialised gate.

Inputs: ``panel_images`` [B,K,3,H,W] (uint8, or float in [-1,1]) where slot ``j`` holds the panel
``j + 1`` steps back, and ``panel_mask`` [B,K] (True = a real panel). With no panels (``None``, K = 0,
or an all-False mask) the outputs are ``None`` and nothing runs: absent panels cost nothing. Like every
image network of moas it starts from random weights; it runs in the main process on the training device,
never in DataLoader workers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moas.models.vision import VisionEncoder
from moas.resources import inference_cache_key

HEAD_DIM = 128  # width of each VisionEncoder head (structure, color, composition)


class PanelMemory(nn.Module):
    """panel_images [B,K,3,H,W] + panel_mask [B,K] → memory [B,K,D] + memory_mask [B,K] (or None, None)."""

    def __init__(
        self,
        dim: int = 512,
        channels: tuple[int, ...] = (64, 128, 256, 512),
        embed_dim: int = 768,
        max_distance: int = 8,
    ) -> None:
        super().__init__()
        self.vision = VisionEncoder(tuple(channels), embed_dim, norm="group")
        feat = embed_dim + 3 * HEAD_DIM
        self.norm = nn.LayerNorm(feat)
        self.proj = nn.Linear(feat, dim)
        self.max_distance = max_distance
        self.distance = nn.Embedding(
            max_distance, dim
        )  # index d-1 for distance d; farther ones share the last
        nn.init.normal_(self.distance.weight, std=0.02)
        # An L3CacheManager at inference (attached by moas.inference.pipeline; never saved): the previous panels are
        # the same at every sampler step, so they are encoded once per panel, not once per step.
        self.cache: Any = None

    def forward(
        self, panel_images: torch.Tensor | None = None, panel_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        if panel_images is None or panel_images.shape[1] == 0:
            return {"memory": None, "memory_mask": None}
        b, k = panel_images.shape[:2]
        dev = self.proj.weight.device
        mask = (
            torch.ones(b, k, dtype=torch.bool, device=dev)
            if panel_mask is None
            else panel_mask.to(dev).bool()
        )
        if not mask.any():
            return {"memory": None, "memory_mask": None}
        key = inference_cache_key(self, "panel_memory", panel_images, mask)
        if key is not None and (cached := self.cache.get(key)) is not None:
            return {"memory": cached, "memory_mask": mask}
        x = panel_images.to(dev).flatten(0, 1)  # (B·K, 3, H, W)
        x = x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x.float()
        keep = mask.flatten()  # (B·K,) only real panels are encoded
        out = self.vision(x[keep])
        feats = torch.cat([out["embedding"], out["structure"], out["color"], out["composition"]], -1)
        tokens_valid = self.proj(self.norm(feats))  # (N, D)
        tokens = tokens_valid.new_zeros(b * k, tokens_valid.shape[-1])
        tokens = tokens.index_copy(0, keep.nonzero().squeeze(1), tokens_valid).view(b, k, -1)  # (B, K, D)
        dist = torch.arange(k, device=dev).clamp(max=self.max_distance - 1)  # slot j = distance j+1
        tokens = tokens + self.distance(dist)[None]  # (B, K, D)
        if key is not None:
            self.cache.put(key, tokens)
        return {"memory": tokens, "memory_mask": mask}
