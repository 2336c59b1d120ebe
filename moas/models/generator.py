"""MoasGenerator: the trainable text-to-image network = conditioning brain + U-Net.

``forward(x_t, t, text)`` takes the text encoding as a dict of tensors (``tokens``, ``mask``, ``tags``,
``tag_mask``) so batches stay plain dicts; the constructor arguments are saved with the weights so the
network can be rebuilt from a model file alone.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from moas.config import ModelConfig, TextConfig
from moas.models.conditioning import ConditioningEncoder
from moas.models.unet import DiffusionModel

TEXT_KEYS = ("tokens", "mask", "tags", "tag_mask")


class MoasGenerator(nn.Module):
    def __init__(self, resolution: int, model: dict[str, Any], text: dict[str, Any]) -> None:
        super().__init__()
        m, tx = ModelConfig(**model), TextConfig(**text)
        self.init_args = {"resolution": resolution, "model": asdict(m), "text": asdict(tx)}
        self.resolution = resolution
        self.brain = ConditioningEncoder(m.conditioning_layers, tx.use_tags, tx.use_tokens)
        self.unet = DiffusionModel(
            resolution=resolution,
            block_channels=m.block_channels,
            cross_attention=m.cross_attention,
            layers_per_block=m.layers_per_block,
            attention_head_dim=m.attention_head_dim,
            cross_attention_dim=m.cross_attention_dim,
            norm_num_groups=m.norm_num_groups,
            patch_size=m.patch_size,
        )

    def condition(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.brain(**{k: text[k] for k in TEXT_KEYS})

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        cond = self.condition(text)
        return self.unet(x_t, t, cond["context"], cond["context_mask"], cond["pooled"])
