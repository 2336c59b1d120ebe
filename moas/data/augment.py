"""Non-leaky image augmentation (Karras et al. 2022, EDM): each training image gets a random flip, zoom,
rotation, translation and colour change, and the U-Net is told which, through a conditioning vector that is
all zeros for an untouched image. Sampling passes zeros, so the model draws un-augmented images: it learns
what a zoomed or recoloured picture looks like without ever producing one by accident.

Geometry is one affine warp per image, sampled from the cache's larger copy of the image (``margin`` × the
training side, the same centre crop), so a zoomed crop has real pixels rather than upsampled ones. The warp
never reads outside the picture: the zoom grows to cover any rotation, and the translation is limited to the
room the zoom leaves. With nothing applied the whole picture is resampled to the training size.

Draws are a pure function of (seed, epoch, image index): a resumed run, a smaller micro-batch after an
out-of-memory error and every DDP rank see the same augmentation of the same image.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AUG_DIM = 8  # flip, shift x, shift y, log zoom, rotation, brightness, log contrast, log saturation
_SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_sides(caption: str) -> str:
    """The caption of the mirrored picture: every whole word "left" becomes "right" and back (case kept)."""

    def swap(m: re.Match) -> str:
        word = m.group(0)
        new = "right" if word.lower() == "left" else "left"
        return new.capitalize() if word[0].isupper() else new

    return _SIDE_WORDS.sub(swap, caption)


@dataclass(frozen=True)
class ImageAugment:
    """Each transform is applied with ``probability``; the ranges are the largest values drawn."""

    probability: float = 0.0  # 0 = off (the cache then keeps no larger copy)
    flip: bool = True  # horizontal mirror, with left/right swapped in the caption
    max_zoom: float = 1.25  # isotropic zoom-in up to this factor (the crop never leaves the picture)
    max_rotation: float = 5.0  # degrees, either way
    translate: bool = True  # shift the crop within the room the zoom leaves
    color: float = 0.1  # brightness ±color, contrast and saturation ×exp(±color)
    margin: float = 1.25  # the cache's larger copy, in units of the training side

    @property
    def active(self) -> bool:
        return self.probability > 0

    def hr_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the cached larger copy for a training size (width, height)."""
        return (round(size[0] * self.margin), round(size[1] * self.margin))

    def draw(self, seed: int, epoch: int, indices: torch.Tensor, aspect: float = 1.0) -> torch.Tensor:
        """Raw parameters (B, AUG_DIM) for images ``indices``; ``aspect`` = height / width of the batch."""
        rows = [self._draw_one(seed, epoch, int(i), aspect) for i in indices.tolist()]
        return torch.tensor(rows, dtype=torch.float32)

    def _draw_one(self, seed: int, epoch: int, index: int, aspect: float) -> list[float]:
        digest = hashlib.sha256(f"augment|{seed}|{epoch}|{index}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))
        u = torch.rand(12, generator=g).tolist()
        p = self.probability
        on = [x < p for x in u[:6]]
        flip = 1.0 if self.flip and on[0] and u[6] < 0.5 else 0.0
        zoom = math.exp(u[7] * math.log(self.max_zoom)) if on[1] else 1.0
        theta = math.radians(self.max_rotation) * (2 * u[8] - 1) if on[2] else 0.0
        c, s = abs(math.cos(theta)), abs(math.sin(theta))
        need_x, need_y = c + s * aspect, s / aspect + c  # half-extent of the rotated crop at zoom 1
        zoom = max(zoom, need_x, need_y)  # a rotated crop must stay inside the picture
        room_x, room_y = max(0.0, 1 - need_x / zoom), max(0.0, 1 - need_y / zoom)
        tx = room_x * (2 * u[9] - 1) if self.translate and on[3] else 0.0
        ty = room_y * (2 * u[10] - 1) if self.translate and on[3] else 0.0
        g2 = torch.rand(3, generator=g).tolist()
        col = self.color if on[4] else 0.0
        bright = col * (2 * g2[0] - 1)
        contrast = col * (2 * g2[1] - 1)
        saturation = col * (2 * u[11] - 1) if on[5] and self.color else 0.0
        return [flip, tx, ty, math.log(zoom), theta, bright, contrast, saturation]

    def conditioning(self, params: torch.Tensor) -> torch.Tensor:
        """The U-Net's view of ``params``: each entry scaled to about [-1, 1]; zeros stay zeros."""
        scale = torch.tensor(
            [
                1.0,
                1.0,
                1.0,
                1.0 / max(math.log(self.max_zoom * 1.1), 1e-3),
                1.0 / max(math.radians(self.max_rotation), 1e-3),
                1.0 / max(self.color, 1e-3),
                1.0 / max(self.color, 1e-3),
                1.0 / max(self.color, 1e-3),
            ],
            device=params.device,
        )
        return params * scale

    @staticmethod
    def matrix(params: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, 2, 3) affine maps from output to source coordinates (both in [-1, 1]); ``size`` = (h, w)."""
        aspect = size[0] / size[1]  # h / w
        flip, tx, ty, logz, theta = (params[:, k] for k in range(5))
        zi, cos, sin = torch.exp(-logz), torch.cos(theta), torch.sin(theta)
        sign = 1 - 2 * flip  # mirror: read the source at -x
        row0 = torch.stack([sign * cos * zi, -sign * sin * aspect * zi, tx], dim=1)
        row1 = torch.stack([sin / aspect * zi, cos * zi, ty], dim=1)
        return torch.stack([row0, row1], dim=1)

    def apply(self, pixels: torch.Tensor, params: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 (B, 3, H', W') larger copies → float (B, 3, h, w) in [-1, 1], ``size`` = (h, w)."""
        x = pixels.float().div(127.5).sub(1.0)
        p = params.to(x.device)
        grid = F.affine_grid(self.matrix(p, size), [x.shape[0], 3, size[0], size[1]], align_corners=False)
        # Bilinear taps: the source is at most `margin` × the output, too little reduction to alias visibly.
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return _colour(out, p[:, 5], p[:, 6], p[:, 7]).clamp(-1, 1)


def _colour(x: torch.Tensor, bright: torch.Tensor, contrast: torch.Tensor, sat: torch.Tensor) -> torch.Tensor:
    """Brightness shift, contrast about each image's mean and saturation about its luminance (B, 3, h, w)."""
    if not (bright.any() or contrast.any() or sat.any()):
        return x
    view = (-1, 1, 1, 1)
    lum = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # (B, 1, h, w)
    x = lum + (x - lum) * torch.exp(sat).view(view)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * torch.exp(contrast).view(view)
    return x + bright.view(view)
