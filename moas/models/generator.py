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
from moas.models.style import DesignStyleSupportSystem
from moas.models.unet import DiffusionModel

TEXT_KEYS = ("tokens", "mask", "tags", "tag_mask")
STYLE_OUTPUTS = ["extra_context", "extra_context_mask"]


class MoasGenerator(nn.Module):
    def __init__(
        self, resolution: int, model: dict[str, Any], text: dict[str, Any], style_dim: int = 0
    ) -> None:
        super().__init__()
        m, tx = ModelConfig(**model), TextConfig(**text)
        self.init_args = {"resolution": resolution, "model": asdict(m), "text": asdict(tx)}
        if style_dim:  # issue 4: optional style token (moas.models.style)
            self.init_args["style_dim"] = style_dim
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
        self.style_dim = style_dim
        if style_dim:
            self.brain.flow.register_module(
                "style", DesignStyleSupportSystem(style_dim), ["style", "style_mask"], STYLE_OUTPUTS
            )

    def condition(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.style_dim:
            return self.brain(**{k: text[k] for k in TEXT_KEYS})
        b, dev = text["tokens"].shape[0], text["tokens"].device
        style = text.get("style", torch.zeros(b, self.style_dim, device=dev))  # (B, S); absent = no style
        style_mask = text.get("style_mask", torch.zeros(b, dtype=torch.bool, device=dev))  # (B,)
        return self.brain(**{k: text[k] for k in TEXT_KEYS}, style=style, style_mask=style_mask)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        cond = self.condition(text)
        return self.unet(x_t, t, cond["context"], cond["context_mask"], cond["pooled"])
