"""Epoch batches: sample weights (repeat folders, ``multiply.txt``), aspect buckets, shuffling.

:class:`BucketBatchSampler` builds a whole epoch's batches of dataset indices as a pure, deterministic
function of (seed, epoch, weights, buckets, batch size): no global RNG. Weights are kohya-style
``N_name`` repeat folders times EveryDream-style ``multiply.txt`` values. An image with weight 2.4 appears
twice every epoch plus once more in some epochs: per bucket, ``Σ fractional parts`` extra copies
(stochastically rounded, so the expected count is exact) are drawn each epoch without replacement with
probability ∝ fractional part, from a generator seeded by (seed, epoch). The number of batches can
therefore differ by one per bucket between epochs. Every batch comes from one bucket; an incomplete last batch is filled by re-drawing from
the same bucket, so no image is dropped. Use it as ``DataLoader(dataset, batch_sampler=sampler)`` and call
``set_epoch(epoch)`` before each epoch.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


def repeat_count(path: Path, root: Path) -> int:
    """kohya-style repeats: the product of ``N`` over folders named ``N_name`` between root and file."""
    n = 1
    for part in path.relative_to(root).parts[:-1]:
        m = _REPEAT_DIR.match(part)
        if m:
            n *= int(m.group(1))
    return n


def _read_multiply(folder: Path) -> float:
    p = folder / "multiply.txt"
    try:
        value = float(p.read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        return 1.0
    except (OSError, ValueError, UnicodeDecodeError):
        log.warning("%s does not hold a number; using 1.", p)
        return 1.0
    if value < 0 or value != value:
        log.warning("%s holds a negative value; using 1.", p)
        return 1.0
    return value


def sample_weight(path: Path, root: Path, _cache: dict[Path, float] | None = None) -> float:
    """Repeats × the product of ``multiply.txt`` values in the file's folder and its parents up to root."""
    weight = float(repeat_count(path, root))
    folder = path.parent
    while True:
        if _cache is not None:
            if folder not in _cache:
                _cache[folder] = _read_multiply(folder)
            weight *= _cache[folder]
        else:
            weight *= _read_multiply(folder)
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return weight


def sample_weights(paths: list[Path], root: Path) -> list[float]:
    cache: dict[Path, float] = {}
    return [sample_weight(p, root, cache) for p in paths]


class BucketBatchSampler:
    """Whole-epoch batches of dataset indices (see module docstring)."""

    def __init__(
        self,
        buckets: list[int],
        weights: list[float],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        fill: bool = True,
    ) -> None:
        if len(buckets) != len(weights):
            raise ValueError("buckets and weights need one entry per dataset item")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.buckets, self.weights = list(buckets), [float(w) for w in weights]
        self.batch_size, self.seed, self.shuffle, self.fill = batch_size, seed, shuffle, fill
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        gen = self._generator(epoch)
        members: dict[int, list[int]] = {}
        for i, b in enumerate(self.buckets):
            if self.weights[i] > 0:
                members.setdefault(b, []).append(i)
        batches: list[list[int]] = []
        for b in sorted(members):
            idx = members[b]
            items: list[int] = []
            fracs = []
            for i in idx:
                whole = int(self.weights[i])
                items += [i] * whole
                fracs.append(self.weights[i] - whole)
            frac = torch.tensor(fracs, dtype=torch.float64)
            total = float(frac.sum())
            extra = int(total) + int(torch.rand((), generator=gen, dtype=torch.float64) < total - int(total))
            if extra > 0:
                picks = torch.multinomial(frac, extra, replacement=False, generator=gen)
                items += [idx[int(j)] for j in picks]
            if not items:
                continue
            order = torch.randperm(len(items), generator=gen).tolist() if self.shuffle else range(len(items))
            items = [items[j] for j in order]
            short = -len(items) % self.batch_size
            if short and self.fill:  # fill the last batch by re-drawing from this bucket
                fill = torch.randint(len(idx), (short,), generator=gen).tolist()
                items += [idx[j] for j in fill]
            batches += [items[k : k + self.batch_size] for k in range(0, len(items), self.batch_size)]
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def __iter__(self):
        return iter(self.epoch_batches(self.epoch))

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))
