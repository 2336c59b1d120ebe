"""Kernel Inception Distance (Bińkowski et al. 2018), here in the folder tag model's feature space.

KID is the unbiased estimate of the squared maximum mean discrepancy (MMD²) between two feature sets under
the cubic polynomial kernel k(a, b) = (a·b / F + 1)³, F the feature size. Unlike FID it has no bias at small
sample counts, which is why moas uses it with a few dozen generated images. It is computed in float64.

The features come from :mod:`moas.eval.tagger` (a CNN trained on the user's folder), not from Inception-v3,
so the numbers are comparable only between moas runs measured with the same tag model: they are not a
published FID or KID.

``std`` is the standard error of one estimate at the sample size used: with more than ``subset_size``
samples on either side it is the spread over ``subsets`` random subsets of ``subset_size`` (the usual KID
protocol); otherwise all samples form one subset and it is the two-sample jackknife estimate.
"""

from __future__ import annotations

import torch


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1.0) ** 3  # (n, m)


def _mmd2_terms(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    # Off-diagonal row sums: the unbiased estimate leaves out each sample's kernel with itself.
    rx = kxx.sum(1) - kxx.diagonal()  # (n,)
    ry = kyy.sum(1) - kyy.diagonal()  # (m,)
    return rx, ry, kxy.sum(1), kxy.sum(0)  # (n,), (m,), (n,), (m,)


def _mmd2(sxx, syy, sxy, n, m):
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² of (n, F) and (m, F) features under the cubic polynomial kernel."""
    rx, ry, kxy_rows, _ = _mmd2_terms(x.double(), y.double())
    return float(_mmd2(rx.sum(), ry.sum(), kxy_rows.sum(), len(x), len(y)))


def _jackknife_var(leave_one_out: torch.Tensor) -> torch.Tensor:
    k = len(leave_one_out)
    return (k - 1) / k * (leave_one_out - leave_one_out.mean()).pow(2).sum()


def mmd2_jackknife(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Unbiased MMD² of all samples and its two-sample delete-one jackknife standard error (Arvesen 1969).

    Each leave-one-out estimate comes in closed form from the kernel matrices' row sums, so this costs one
    estimate. Needs at least 3 samples on each side.
    """
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    rx, ry, kxy_rows, kxy_cols = _mmd2_terms(x, y)
    sxx, syy, sxy = rx.sum(), ry.sum(), kxy_rows.sum()
    full = _mmd2(sxx, syy, sxy, n, m)
    drop_x = _mmd2(sxx - 2 * rx, syy, sxy - kxy_rows, n - 1, m)  # (n,) each x_i left out
    drop_y = _mmd2(sxx, syy - 2 * ry, sxy - kxy_cols, n, m - 1)  # (m,)
    var = _jackknife_var(drop_x) + _jackknife_var(drop_y)
    return float(full), float(var.sqrt())


def kid(
    x: torch.Tensor, y: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std) between features x (N, F) and y (M, F); see the module docstring for ``std``.

    With N and M at most ``subset_size`` every sample is used once, so small sets stay unbiased.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"KID needs two (N, F) feature sets of one width, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if min(len(x), len(y)) < 3:
        raise ValueError(f"KID needs at least 3 samples on each side, got {len(x)} and {len(y)}.")
    if len(x) <= subset_size and len(y) <= subset_size:
        return mmd2_jackknife(x, y)
    k = min(subset_size, len(x), len(y))
    gen = torch.Generator().manual_seed(seed)
    vals = torch.tensor(
        [
            mmd2_unbiased(
                x[torch.randperm(len(x), generator=gen)[:k]], y[torch.randperm(len(y), generator=gen)[:k]]
            )
            for _ in range(subsets)
        ],
        dtype=torch.float64,
    )
    return float(vals.mean()), float(vals.std()) if subsets > 1 else 0.0
