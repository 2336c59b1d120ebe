"""KID: the unbiased MMD² under the cubic kernel, its jackknife error, and its behaviour on known distributions."""

from __future__ import annotations

import pytest
import torch

from moas.eval.kid import kid, mmd2_jackknife, mmd2_unbiased


def gaussian(n: int, f: int = 16, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, f, generator=torch.Generator().manual_seed(seed)) + shift


def naive_mmd2(a: torch.Tensor, b: torch.Tensor) -> float:
    """The textbook double sums, one pair at a time."""
    a, b = a.double(), b.double()
    f, n, m = a.shape[1], len(a), len(b)

    def k(u, v):
        return float((u @ v / f + 1) ** 3)

    xx = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_matches_the_textbook_formula():
    x, y = gaussian(7, seed=1), gaussian(5, seed=2, shift=0.3)
    assert mmd2_unbiased(x, y) == pytest.approx(naive_mmd2(x, y), abs=1e-10)
    assert kid(x, y)[0] == pytest.approx(naive_mmd2(x, y), abs=1e-10)  # small sets: all samples, one subset


def test_jackknife_matches_brute_force_leave_one_out():
    x, y = gaussian(6, seed=3), gaussian(5, seed=4, shift=0.5)
    loo_x = torch.tensor(
        [naive_mmd2(torch.cat([x[:i], x[i + 1 :]]), y) for i in range(6)], dtype=torch.float64
    )
    loo_y = torch.tensor(
        [naive_mmd2(x, torch.cat([y[:j], y[j + 1 :]])) for j in range(5)], dtype=torch.float64
    )
    var = 5 / 6 * (loo_x - loo_x.mean()).pow(2).sum() + 4 / 5 * (loo_y - loo_y.mean()).pow(2).sum()
    mean, std = mmd2_jackknife(x, y)
    assert mean == pytest.approx(naive_mmd2(x, y), abs=1e-10)
    assert std == pytest.approx(float(var.sqrt()), rel=1e-8)


def test_same_distribution_is_near_zero_and_a_shift_is_clearly_positive():
    x, y = gaussian(200, seed=10), gaussian(150, seed=11)
    same, same_std = kid(x, y)
    assert abs(same) < 3 * same_std and abs(same) < 0.05  # unbiased: can be slightly negative
    moved, moved_std = kid(x, gaussian(150, seed=11, shift=0.5))
    assert moved > 0.5 and moved > 5 * moved_std
    wider, _ = kid(x, gaussian(150, seed=11) * 1.5)
    assert 3 * same_std < wider < moved  # a smaller change gives a smaller distance
    # A set against itself: about 0 (a little below, since the cross term keeps the self-pairs the
    # within-set terms leave out), tiny beside any shift.
    itself, _ = kid(x, x)
    assert -0.1 < itself <= 0 and abs(itself) < moved / 10


def test_symmetric():
    x, y = gaussian(40, seed=5), gaussian(30, seed=6, shift=0.2)
    a, b = kid(x, y), kid(y, x)
    assert a[0] == pytest.approx(b[0], abs=1e-12) and a[1] == pytest.approx(b[1], abs=1e-12)


def test_large_sets_use_random_subsets():
    x, y = gaussian(300, seed=7), gaussian(250, seed=8)
    mean, std = kid(x, y, subsets=20, subset_size=100, seed=0)
    assert abs(mean) < 0.05 and std > 0
    assert kid(x, y, subsets=20, subset_size=100, seed=0) == (mean, std)  # seed-fixed subsets
    moved, _ = kid(x, gaussian(250, seed=8, shift=0.5), subsets=20, subset_size=100)
    assert moved > 0.5


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least 3"):
        kid(gaussian(2), gaussian(10))
    with pytest.raises(ValueError, match="one width"):
        kid(gaussian(10, f=8), gaussian(10, f=16))
