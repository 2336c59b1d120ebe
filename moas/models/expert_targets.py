"""Per-expert domain targets computed from the training image: a signal that says what an expert is about.

Each function maps images x [B,3,H,W] in [-1, 1] to a target [B,K] (float32, no gradient needed):

* ``palette`` (``color``): the mean colour (3) and a 4-bin histogram per channel (12 fractions);
* ``edge_density`` (``line_art``): the share of pixels whose Sobel gradient magnitude of the luminance
  exceeds ``EDGE_THRESHOLD`` (1);
* ``luminance_grid`` (``light``): mean luminance over a 4×4 grid (16);
* ``layout_grid`` (``scene``): mean colour over a 4×4 grid, the low-frequency layout (48);
* ``symmetry`` (``anatomy``): 1 − mean |x − mirror(x)| / 2, so a left-right mirror-symmetric image is 1 (1);
* ``sharpness`` (``precision``): log(1 + mean squared Laplacian of the luminance) (1).

Gradients and Laplacians use valid convolutions (no padding), so a flat image has zero edges and zero
sharpness also at its border. Luminance is Rec. 601 (0.299 R + 0.587 G + 0.114 B).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GRID = 4  # cells per side of the luminance and layout grids
HIST_BINS = 4  # histogram bins per colour channel
EDGE_THRESHOLD = 0.25  # Sobel magnitude (image units of [-1, 1], kernel sum 4) counted as an edge
_LUMA = (0.299, 0.587, 0.114)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] → [B,1,H,W]."""
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def palette(x: torch.Tensor) -> torch.Tensor:
    """Mean colour and per-channel histograms: [B, 3 + 3·HIST_BINS]."""
    x = x.float()
    mean = x.mean((2, 3))  # (B, 3)
    # Bin of each value in [-1, 1]; 1.0 itself falls into the last bin.
    bins = ((x.clamp(-1, 1) + 1) * (HIST_BINS / 2)).long().clamp(max=HIST_BINS - 1)  # (B, 3, H, W)
    hist = F.one_hot(bins.flatten(2), HIST_BINS).float().mean(2)  # (B, 3, HIST_BINS)
    return torch.cat([mean, hist.flatten(1)], 1)


def _sobel_magnitude(y: torch.Tensor) -> torch.Tensor:
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=y.device)
    k = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    g = F.conv2d(y, k)  # (B, 2, H-2, W-2)
    return g.pow(2).sum(1).sqrt()  # (B, H-2, W-2)


def edge_density(x: torch.Tensor) -> torch.Tensor:
    """Share of edge pixels: [B, 1] in [0, 1]."""
    mag = _sobel_magnitude(luminance(x.float()))
    return (mag > EDGE_THRESHOLD).float().mean((1, 2)).unsqueeze(1)


def luminance_grid(x: torch.Tensor) -> torch.Tensor:
    """Mean luminance per grid cell: [B, GRID²]."""
    return F.adaptive_avg_pool2d(luminance(x.float()), GRID).flatten(1)


def layout_grid(x: torch.Tensor) -> torch.Tensor:
    """Mean colour per grid cell: [B, 3·GRID²]."""
    return F.adaptive_avg_pool2d(x.float(), GRID).flatten(1)


def symmetry(x: torch.Tensor) -> torch.Tensor:
    """Left-right mirror symmetry: [B, 1] in [0, 1] (1 = the image equals its mirror)."""
    x = x.float()
    return 1.0 - (x - x.flip(-1)).abs().mean((1, 2, 3)).unsqueeze(1) / 2


def sharpness(x: torch.Tensor) -> torch.Tensor:
    """log(1 + Laplacian energy of the luminance): [B, 1], 0 for a flat image."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=x.device).view(1, 1, 3, 3)
    lap = F.conv2d(luminance(x.float()), k)  # (B, 1, H-2, W-2)
    return torch.log1p(lap.pow(2).mean((1, 2, 3))).unsqueeze(1)


# Expert name → (target function, target width).
EXPERT_TARGETS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
    "color": (palette, 3 + 3 * HIST_BINS),
    "line_art": (edge_density, 1),
    "light": (luminance_grid, GRID * GRID),
    "scene": (layout_grid, 3 * GRID * GRID),
    "anatomy": (symmetry, 1),
    "precision": (sharpness, 1),
}


@torch.no_grad()
def expert_targets(x: torch.Tensor, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Every (or the named) expert's target for images x [B,3,H,W] in [-1, 1]."""
    return {n: EXPERT_TARGETS[n][0](x) for n in (names or tuple(EXPERT_TARGETS))}
