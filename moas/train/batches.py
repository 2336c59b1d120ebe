"""Batch plans and the resumable, shardable batch sampler.

A *batch plan* decides which dataset indices form each micro-batch of an epoch. It is a pure function of
(seed, epoch), so the position inside an epoch is just ``(epoch, batch index)``: a resumed run rebuilds the
same list and skips the batches already trained on — no DataLoader RNG state is needed.

:class:`UniformBatchPlan` is the default (a seeded shuffle cut into equal batches, the last partial batch
dropped). Any object with ``epoch_batches(epoch) -> list[list[int]]`` and a ``batch_size`` attribute can
replace it (a weighted or aspect-bucketed plan, for example).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import Sampler


class BatchPlan(Protocol):
    batch_size: int

    def epoch_batches(self, epoch: int) -> list[list[int]]: ...


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed derived from (seed, epoch); stable across Python processes (unlike ``hash``)."""
    digest = hashlib.sha256(f"moas-batches|{seed}|{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class UniformBatchPlan:
    """Every image once per epoch in a seeded random order, cut into batches of ``batch_size``.

    Halving ``batch_size`` keeps the order of images (the permutation depends on seed and epoch only), so a
    run that shrinks its micro-batch after an out-of-memory error continues on exactly the same images.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, drop_last: bool = True) -> None:
        if num_items < 1 or batch_size < 1:
            raise ValueError(f"need num_items >= 1 and batch_size >= 1, got {num_items}, {batch_size}")
        self.num_items = num_items
        self.batch_size = min(batch_size, num_items)
        self.seed = seed
        self.drop_last = drop_last

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(self.num_items, generator=gen).tolist()
        bs = self.batch_size
        stop = len(order) - len(order) % bs if self.drop_last else len(order)
        return [order[i : i + bs] for i in range(0, stop, bs)]


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Rank ``rank``'s share: every ``world_size``-th batch, cut so all ranks get the same count."""
    per_rank = len(batches) // world_size
    return batches[rank::world_size][:per_rank]


def batches_per_epoch(plan: BatchPlan, world_size: int = 1, epoch: int = 0) -> int:
    return len(plan.epoch_batches(epoch)) // world_size


class ResumableBatchSampler(Sampler[list[int]]):
    """``DataLoader(batch_sampler=...)`` for one epoch of a plan, from batch ``start_batch`` on, one rank's shard."""

    def __init__(
        self, plan: BatchPlan, epoch: int, start_batch: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.batches = shard_batches(plan.epoch_batches(epoch), rank, world_size)
        self.start_batch = max(0, start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches[self.start_batch :]

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start_batch)
