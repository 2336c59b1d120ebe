"""Image-space loss terms of ``AdvancedLossFunctions``: pixel, SSIM, line art, colour harmony, Gram style.

Every term takes images in the model range [-1, 1], shape (B, 3, H, W), and returns one value per sample,
shape (B,), so the caller can weight samples (e.g. toward low-noise timesteps) before averaging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)  # (B,)


def combined_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mixed_precision: bool,
    mse_weight: float = 0.5,
    l1_weight: float = 0.5,
) -> torch.Tensor:
    """The original's combined loss: pure L1 under mixed precision (scale-stable), else 0.5·MSE + 0.5·L1."""
    diff = pred.float() - target.float()
    l1 = _per_sample(diff.abs())
    if mixed_precision:
        return l1
    return mse_weight * _per_sample(diff.square()) + l1_weight * l1


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()  # (C, 1, k, k)


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-sample SSIM (Wang et al. 2004) on [0, 1] images with a Gaussian window; 1 for identical images.

    The window shrinks for images smaller than 11 px. Constants C1 = 0.01², C2 = 0.03² (data range 1).
    """
    x, y = pred.float(), target.float()
    c = x.shape[1]
    k = min(window, x.shape[-1], x.shape[-2])
    k = k if k % 2 == 1 else k - 1
    w = _gaussian_window(k, sigma, c, x.device, x.dtype)
    mu1, mu2 = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)  # (B, C, h, w)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = F.conv2d(x * x, w, groups=c) - mu1_sq
    sigma2_sq = F.conv2d(y * y, w, groups=c) - mu2_sq
    sigma12 = F.conv2d(x * y, w, groups=c) - mu1_mu2
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / (
        (mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2)
    )
    return _per_sample(ssim_map)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original's ``1 - ssim_map.mean()``, per sample, on images mapped from [-1, 1] to [0, 1]."""
    return 1.0 - ssim((pred + 1) / 2, (target + 1) / 2)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of (B, 3, H, W) → (B, 1, H, W)."""
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the luma, (B, 1, H, W); replicate padding keeps borders edge-free."""
    g = luminance(x.float())
    kx = SOBEL_X.to(g.device, g.dtype).view(1, 1, 3, 3)
    ky = kx.transpose(-1, -2)
    gp = F.pad(g, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(gp, kx), F.conv2d(gp, ky)
    return torch.sqrt(gx * gx + gy * gy + 1e-8)


def laplacian(x: torch.Tensor) -> torch.Tensor:
    g = F.pad(luminance(x.float()), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(g, LAPLACIAN.to(g.device, g.dtype).view(1, 1, 3, 3))  # (B, 1, H, W)


def line_art_loss(pred: torch.Tensor, target: torch.Tensor, thickness_weight: float = 0.5) -> torch.Tensor:
    """Edge structure (L1 between Sobel magnitudes) + line thickness (L1 between |Laplacian| maps).

    The Laplacian responds on both sides of a stroke, so its blurred magnitude measures how wide the lines
    are; comparing it after a 3×3 average keeps the term from only rewarding exact pixel alignment.
    """
    edge = _per_sample((sobel_magnitude(pred) - sobel_magnitude(target)).abs())
    lp, lt = laplacian(pred).abs(), laplacian(target).abs()
    thick = _per_sample((F.avg_pool2d(lp, 3, 1, 1) - F.avg_pool2d(lt, 3, 1, 1)).abs())
    return edge + thickness_weight * thick


def soft_histogram(x: torch.Tensor, bins: int = 16, bandwidth: float | None = None) -> torch.Tensor:
    """Differentiable per-channel histogram of values in [-1, 1]: (B, C, H, W) → (B, C, bins), rows sum to 1."""
    centres = torch.linspace(-1, 1, bins, device=x.device, dtype=torch.float32)
    bw = bandwidth or 2.0 / (bins - 1)
    v = x.float().flatten(2).clamp(-1, 1).unsqueeze(-1)  # (B, C, N, 1)
    k = torch.exp(-0.5 * ((v - centres) / bw) ** 2)  # (B, C, N, bins)
    h = k.sum(2)
    return h / h.sum(-1, keepdim=True).clamp_min(1e-8)


def color_harmony_loss(pred: torch.Tensor, target: torch.Tensor, bins: int = 16) -> torch.Tensor:
    """Colour-distribution distance: L1 between per-channel soft histograms + mean/std and saturation match."""
    hist = (soft_histogram(pred, bins) - soft_histogram(target, bins)).abs().sum(-1).mean(-1)  # (B,)
    p, t = pred.float().flatten(2), target.float().flatten(2)
    moments = (p.mean(-1) - t.mean(-1)).abs().mean(-1) + (p.std(-1) - t.std(-1)).abs().mean(-1)
    sat_p = pred.float().amax(1) - pred.float().amin(1)  # (B, H, W) chroma as a saturation proxy
    sat_t = target.float().amax(1) - target.float().amin(1)
    sat = (sat_p.flatten(1).mean(1) - sat_t.flatten(1).mean(1)).abs()
    return hist + moments + sat


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix averaged over positions, (B, C, H, W) → (B, C, C): channel co-activation statistics."""
    b, c, h, w = features.shape
    f = features.float().flatten(2)  # (B, C, HW)
    return f @ f.transpose(1, 2) / (h * w)


def gram_loss(pred_feats: list[torch.Tensor], target_feats: list[torch.Tensor]) -> torch.Tensor:
    """Style consistency: mean absolute Gram-matrix difference over feature levels, per sample.

    Gram matrices ignore where things are, so the term compares texture and stroke statistics (style),
    not layout: a shifted copy scores near zero, a blurred or recoloured one does not.
    """
    terms = [
        (gram(p) - gram(t)).abs().flatten(1).mean(1) for p, t in zip(pred_feats, target_feats, strict=True)
    ]
    return torch.stack(terms, 0).sum(0)
