"""SuperResDiffusion: the cascade's second stage, a randomly initialised U-Net that denoises a
high-resolution image given the low-resolution one.

Inputs (cascaded diffusion, Ho et al. 2021; Saharia et al. 2022): the noisy high-resolution image and, as
three more input channels, the low-resolution image upsampled to the same size with Gaussian noise of a
known level added (:mod:`moas.diffusion.sr_condition`). The noise level and the prompt enter through the
time embedding: a sinusoidal embedding of the level and a projection of the prompt's mean tag embedding
are added to it. The network is convolutional with attention only at its coarsest level, so it is trained
on crops and applied to whole images.

The forward follows the diffusion objective's contract, ``(x_t, t, cond) -> (prediction, aux)``, with
``cond = {"low": (B, 3, H, W), "level": (B,), "text": (B, D)}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn


def level_embedding(level: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of conditioning noise levels in [0, 1]: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=level.device) / half)  # (half,)
    angles = level.float()[:, None] * 1000.0 * freqs[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class SuperResDiffusion(nn.Module):
    def __init__(
        self,
        block_channels: list[int],
        attention: list[bool],
        layers_per_block: int = 1,
        patch_size: int = 1,
        text_dim: int = 768,
        scale: int = 4,
        attention_head_dim: int = 32,
    ) -> None:
        super().__init__()
        self.init_args = {
            "block_channels": list(block_channels),
            "attention": list(attention),
            "layers_per_block": layers_per_block,
            "patch_size": patch_size,
            "text_dim": text_dim,
            "scale": scale,
            "attention_head_dim": attention_head_dim,
        }
        self.patch_size, self.scale = patch_size, scale
        self.unit = patch_size * 2 ** (len(block_channels) - 1)  # image sides must be multiples of this
        ch = 3 * patch_size**2
        temb = block_channels[0] * 4  # diffusers' time-embedding width
        self.unet = UNet2DModel(
            in_channels=2 * ch,
            out_channels=ch,
            block_out_channels=tuple(block_channels),
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=min(32, block_channels[0] // 2),
            class_embed_type="identity",  # receives the summed text + level embedding below
            add_attention=attention[-1],
        )
        self.level_dim = block_channels[0]
        self.level_proj = nn.Sequential(nn.Linear(self.level_dim, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.text_proj = nn.Sequential(nn.Linear(text_dim, temb), nn.SiLU(), nn.Linear(temb, temb))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> tuple[torch.Tensor, float]:
        """x_t, cond["low"]: (B, 3, H, W) with H, W multiples of ``unit``; returns the prediction (B, 3, H, W)."""
        p = self.patch_size
        x = torch.cat([x_t, cond["low"].to(x_t.dtype)], dim=1)  # (B, 6, H, W)
        if p > 1:
            x = F.pixel_unshuffle(x, p)
        emb = self.level_proj(level_embedding(cond["level"], self.level_dim).to(x.dtype))
        emb = emb + self.text_proj(cond["text"].to(x.dtype))  # (B, temb)
        out = self.unet(x, t, class_labels=emb).sample
        if p > 1:
            out = F.pixel_shuffle(out, p)
        return out, 0.0
