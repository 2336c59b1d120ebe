"""Image metrics: PSNR, SSIM, the per-expert and art-theory measurements, and ValidationMetrics.

All functions take float images in the model range [-1, 1], shape (B, 3, H, W), and return one value per
image, shape (B,). Nothing here is trained on: these are measurements that the run logs.

Per-expert and art-theory measurements compare the model's predicted x0 with the real x0 (lower = closer):

* ``line_art``: mean absolute difference of Sobel edge magnitudes of the luminance (line work).
* ``color``: total-variation distance between 16-bin per-channel RGB histograms (palette).
* ``background``: mean squared error of 4×4 block averages (low frequencies: layout and large areas).
* ``anatomy``: difference of left-right symmetry errors |S(pred) − S(real)|, S(x) = mean |x − flip(x)|
  (a frontal figure is close to mirror-symmetric; broken anatomy changes that).
* ``perspective``: total-variation distance between 8-bin, magnitude-weighted gradient-orientation
  histograms (the directions of the lines that build the space).
* ``color_harmony``: total-variation distance between 12-bin hue histograms weighted by saturation.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

EXPERT_MEASURES = ("line_art", "color", "background")
ART_THEORY_MEASURES = ("anatomy", "perspective", "color_harmony")


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], float32."""
    return ((x.float().clamp(-1, 1) + 1) / 2).contiguous()


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → (B, 1, H, W), Rec. 601 weights."""
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def psnr(pred: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB on [0, 1] images, per image (B,); capped at 100 dB for exact copies."""
    mse = F.mse_loss(_unit(pred), _unit(real), reduction="none").mean((1, 2, 3))  # (B,)
    return (10 * torch.log10(1.0 / mse.clamp(min=1e-10))).clamp(max=100.0)


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, device=device) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()  # (C, 1, k, k)


def ssim(pred: torch.Tensor, real: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) on [0, 1] images with a Gaussian window, per image (B,).

    The window shrinks to the image for very small images (odd size, at most the shorter side).
    """
    x, y = _unit(pred), _unit(real)
    c = x.shape[1]
    k = min(window, min(x.shape[-2:]))
    k -= 1 - k % 2  # odd
    w = _gaussian_window(k, sigma, c, x.device)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)  # (B, C, H', W')
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return m.mean((1, 2, 3))


def sobel(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical Sobel responses of (B, 1, H, W), same size (replicate padding)."""
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=gray.device).view(1, 1, 3, 3) / 8
    p = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(p, kx), F.conv2d(p, kx.transpose(2, 3))  # (B, 1, H, W) each


def _hist(values: torch.Tensor, bins: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised histograms of (B, N) values in [0, 1] → (B, bins)."""
    idx = (values * bins).long().clamp(0, bins - 1)
    w = torch.ones_like(values) if weights is None else weights
    h = torch.zeros(values.shape[0], bins, device=values.device).scatter_add_(1, idx, w)
    return h / h.sum(1, keepdim=True).clamp(min=1e-8)


def _tv(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total-variation distance between histograms (B, bins) → (B,), in [0, 1]."""
    return 0.5 * (p - q).abs().sum(1)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) in [0, 1] → hue in [0, 1), saturation, value; each (B, H, W)."""
    r, g, b = x.unbind(1)
    mx, mn = x.max(1).values, x.min(1).values
    d = (mx - mn).clamp(min=1e-8)
    h = torch.where(mx == r, ((g - b) / d) % 6, torch.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(mx - mn > 1e-8, h / 6, torch.zeros_like(h))
    s = torch.where(mx > 1e-8, (mx - mn) / mx.clamp(min=1e-8), torch.zeros_like(mx))
    return h % 1.0, s, mx


def line_art_error(pred: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    gp, gr = (torch.hypot(*sobel(luminance(_unit(v)))) for v in (pred, real))
    return (gp - gr).abs().mean((1, 2, 3))


def color_error(pred: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    p, r = _unit(pred), _unit(real)
    per_channel = [_tv(_hist(p[:, c].flatten(1), 16), _hist(r[:, c].flatten(1), 16)) for c in range(3)]
    return torch.stack(per_channel, 1).mean(1)


def background_error(pred: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    k = max(1, min(pred.shape[-2:]) // 4)
    lp, lr = F.avg_pool2d(_unit(pred), k), F.avg_pool2d(_unit(real), k)  # (B, 3, H/k, W/k)
    return (lp - lr).pow(2).mean((1, 2, 3))


def symmetry_error(x: torch.Tensor) -> torch.Tensor:
    u = _unit(x)
    return (u - u.flip(-1)).abs().mean((1, 2, 3))


def anatomy_error(pred: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return (symmetry_error(pred) - symmetry_error(real)).abs()


def _orientation_hist(x: torch.Tensor, bins: int = 8) -> torch.Tensor:
    gx, gy = sobel(luminance(_unit(x)))
    angle = (torch.atan2(gy, gx) % math.pi) / math.pi  # (B, 1, H, W) in [0, 1): undirected
    return _hist(angle.flatten(1), bins, torch.hypot(gx, gy).flatten(1))


def perspective_error(pred: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return _tv(_orientation_hist(pred), _orientation_hist(real))


def _hue_hist(x: torch.Tensor, bins: int = 12) -> torch.Tensor:
    h, s, _ = rgb_to_hsv(_unit(x))
    return _hist(h.flatten(1), bins, s.flatten(1) + 1e-6)


def color_harmony_error(pred: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return _tv(_hue_hist(pred), _hue_hist(real))


MEASURES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "line_art": line_art_error,
    "color": color_error,
    "background": background_error,
    "anatomy": anatomy_error,
    "perspective": perspective_error,
    "color_harmony": color_harmony_error,
}


@torch.no_grad()
def art_measurements(pred_x0: torch.Tensor, real_x0: torch.Tensor) -> dict[str, float]:
    """Batch means of the six measurements, keyed ``expert/<name>`` and ``art_theory/<name>``."""
    out = {}
    for name, fn in MEASURES.items():
        group = "expert" if name in EXPERT_MEASURES else "art_theory"
        out[f"{group}/{name}"] = float(fn(pred_x0, real_x0).mean())
    return out


class ValidationMetrics:
    """Rolling history (deque, maxlen 1000) per metric with its running average and latest value.

    The original tracks PSNR, SSIM and accuracy; any other metric name can be added with ``update``.
    """

    def __init__(self, names: Iterable[str] = ("psnr", "ssim", "accuracy"), maxlen: int = 1000) -> None:
        self.maxlen = maxlen
        self.history: dict[str, deque[float]] = {n: deque(maxlen=maxlen) for n in names}

    def update(self, **values: float | None) -> None:
        """Append each given value; ``None`` (metric not measurable this time) is skipped."""
        for k, v in values.items():
            if v is None or not math.isfinite(float(v)):
                continue
            self.history.setdefault(k, deque(maxlen=self.maxlen)).append(float(v))

    def latest(self, name: str) -> float | None:
        h = self.history.get(name)
        return h[-1] if h else None

    def average(self, name: str) -> float | None:
        h = self.history.get(name)
        return sum(h) / len(h) if h else None

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        return {
            k: {"latest": self.latest(k), "average": self.average(k), "count": len(h)}
            for k, h in self.history.items()
        }

    def state_dict(self) -> dict[str, list[float]]:
        return {k: list(h) for k, h in self.history.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        for k, values in state.items():
            self.history[k] = deque((float(v) for v in values), maxlen=self.maxlen)
