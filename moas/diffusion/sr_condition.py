"""The super-resolution stage's conditioning, shared by training and generation.

* the low-resolution image: the high-resolution one area-downsampled ``scale``× in training (the base
  model's output at generation), upsampled back with bicubic filtering;
* conditioning noise augmentation (Ho et al. 2021): that upsampled image is noised,
  ``sqrt(1 - l²)·low + l·ε``, with the level ``l`` drawn uniformly in training and fixed and small at
  generation, and ``l`` is given to the network. A stage trained only on clean downsampled images trusts
  its input exactly; the base model's samples are not such images, and the noise teaches the stage which
  of the input's detail to keep;
* the prompt: the mean of its tag embeddings (what the text bank already holds for every caption);
* random crops: the stage trains on crops of the high-resolution images, many distinct samples per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def downsample(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H/scale, W/scale) by averaging (what a smaller rendering of the image is)."""
    return F.avg_pool2d(hr, scale)


def upsample(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, h, w) in [-1, 1] -> (B, 3, *size) bicubic, kept in [-1, 1]."""
    return F.interpolate(low.float(), size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def noisy_condition(up: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Variance-preserving noise of level ``level`` (B,) in [0, 1] on ``up`` (B, 3, H, W)."""
    lv = level.to(up.dtype).view(-1, 1, 1, 1)
    return (1 - lv**2).sqrt() * up + lv * noise


def tag_vector(tags: torch.Tensor, tag_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tag embeddings: (B, G, D), (B, G) -> (B, D); zero for an empty prompt."""
    m = tag_mask.to(tags.dtype).unsqueeze(-1)  # (B, G, 1)
    return (tags * m).sum(1) / m.sum(1).clamp(min=1.0)


def crop_offsets(
    sizes: list[tuple[int, int]], crop: int, generator: torch.Generator
) -> list[tuple[int, int]]:
    """(top, left) of a ``crop``-sided square inside each (height, width), uniformly at random."""
    out = []
    for h, w in sizes:
        if h < crop or w < crop:
            raise ValueError(f"a {crop}-pixel crop does not fit a {w}x{h} image")
        top = int(torch.randint(h - crop + 1, (1,), generator=generator))
        left = int(torch.randint(w - crop + 1, (1,), generator=generator))
        out.append((top, left))
    return out


def take_crops(images: list[torch.Tensor], offsets: list[tuple[int, int]], crop: int) -> torch.Tensor:
    """The crops of (3, H, W) images at ``offsets``, stacked: (B, 3, crop, crop)."""
    return torch.stack(
        [im[:, y : y + crop, x : x + crop] for im, (y, x) in zip(images, offsets, strict=True)]
    )


def sr_inputs(hr: torch.Tensor, scale: int, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Training conditioning for high-resolution crops ``hr`` (B, 3, H, W): downsample, upsample, noise."""
    return noisy_condition(upsample(downsample(hr, scale), tuple(hr.shape[-2:])), level, noise)
