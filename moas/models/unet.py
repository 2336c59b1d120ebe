"""DiffusionModel: a randomly initialised diffusers U-Net with cross-attention at several scales.

The network only does ``forward(x_t, t, context, context_mask, pooled) -> prediction``; noising, the loss
and sampling live in ``moas.diffusion``. ``patch_size`` > 1 folds p×p pixel patches into channels
(pixel-unshuffle) before the U-Net and unfolds them after, which makes the full-resolution level p² times
cheaper — the difference between minutes and hours on a 2-core CPU.

Two switches change how the U-Net computes, not what: ``use_channels_last`` (NHWC weights and inputs, which
cuDNN's convolutions run fastest in on tensor-core GPUs) and ``use_gradient_checkpointing`` (each block's
activations are recomputed in the backward pass instead of stored: less memory for some more compute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn


def attention_heads(block_channels: list[int], head_dim: int, legacy: bool = False) -> tuple[int, ...]:
    """Attention heads per level: ``channels // head_dim``, so every head has ``head_dim`` channels.

    ``legacy``: models saved before this rule ran ``head_dim`` heads at every level (diffusers takes its
    ``attention_head_dim`` argument as a head count), e.g. 32 heads of 4 channels at a 128-wide level; their
    weights fit either way, so they keep the head split they were trained with."""
    if legacy:
        return (head_dim,) * len(block_channels)
    return tuple(max(1, c // head_dim) for c in block_channels)


class DiffusionModel(nn.Module):
    def __init__(
        self,
        resolution: int,
        block_channels: list[int],
        cross_attention: list[bool],
        layers_per_block: int = 1,
        attention_head_dim: int = 32,
        cross_attention_dim: int = 768,
        norm_num_groups: int = 32,
        patch_size: int = 1,
        in_channels: int = 3,
        legacy_head_count: bool = False,
        augment_dim: int = 0,
    ) -> None:
        super().__init__()
        if resolution % (patch_size * 2 ** (len(block_channels) - 1)):
            raise ValueError("resolution must be divisible by patch_size * 2**(levels - 1)")
        heads = attention_heads(block_channels, attention_head_dim, legacy_head_count)
        self.patch_size = patch_size
        self.channels_last = False
        ch = in_channels * patch_size**2
        down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross_attention)
        up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross_attention))
        self.unet = UNet2DConditionModel(
            sample_size=resolution // patch_size,
            in_channels=ch,
            out_channels=ch,
            block_out_channels=tuple(block_channels),
            down_block_types=down,
            up_block_types=up,
            mid_block_type="UNetMidBlock2DCrossAttn",
            layers_per_block=layers_per_block,
            # diffusers reads this argument as the number of heads per level (its own naming quirk).
            attention_head_dim=heads,
            cross_attention_dim=cross_attention_dim,
            norm_num_groups=norm_num_groups,
            # The pooled text vector joins the timestep embedding: a cheap, fast-learning global path
            # next to the per-token cross-attention.
            class_embed_type="projection",
            projection_class_embeddings_input_dim=cross_attention_dim,
        )

        # Image-augmentation parameters join the pooled vector through a bias-free, zero-initialised
        # projection: an untrained one and an all-zero input (sampling) both leave the network unchanged.
        self.augment_embed: nn.Linear | None = None
        if augment_dim:
            self.augment_embed = nn.Linear(augment_dim, cross_attention_dim, bias=False)
            nn.init.zeros_(self.augment_embed.weight)

    def use_channels_last(self, on: bool = True) -> None:
        self.channels_last = on
        self.unet.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def use_gradient_checkpointing(self, on: bool = True) -> None:
        if on:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def forward(
        self,
        x: torch.Tensor,  # (B, 3, H, W) noisy image in [-1, 1] scale
        t: torch.Tensor,  # (B,) integer timesteps
        context: torch.Tensor,  # (B, T, 768)
        context_mask: torch.Tensor,  # (B, T) bool, True = attend
        pooled: torch.Tensor,  # (B, 768)
        augment: torch.Tensor | None = None,  # (B, augment_dim) augmentation parameters; None = zeros
    ) -> torch.Tensor:
        if augment is not None and self.augment_embed is not None:
            pooled = pooled + self.augment_embed(augment.to(pooled.dtype))
        p = self.patch_size
        h = F.pixel_unshuffle(x, p) if p > 1 else x  # (B, 3p², H/p, W/p)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        out = self.unet(
            h, t, encoder_hidden_states=context, encoder_attention_mask=context_mask, class_labels=pooled
        ).sample
        return F.pixel_shuffle(out, p) if p > 1 else out  # (B, 3, H, W)
