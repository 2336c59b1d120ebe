"""The resumable, shardable batch sampler of the training loop.

The batch plan (``moas.data.sampler.BucketBatchSampler``) is a pure function of (seed, epoch), and its unit
is one *optimizer step*: ``micro-batch × accumulation`` images from one aspect bucket. Each unit is cut into
micro-batches here. Because the plan never depends on the micro-batch, a run that shrinks its micro-batch
after an out-of-memory error (keeping the product) learns from exactly the same images in every step, and
the position inside an epoch is just ``(epoch, micro-batch index)``: a resumed run rebuilds the same list
and skips the batches already trained on — no DataLoader RNG state is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from torch.utils.data import Sampler


class BatchPlan(Protocol):
    batch_size: int

    def epoch_batches(self, epoch: int) -> list[list[int]]: ...


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Rank ``rank``'s share: every ``world_size``-th batch, cut so all ranks get the same count."""
    per_rank = len(batches) // world_size
    return batches[rank::world_size][:per_rank]


def steps_per_epoch(plan: BatchPlan, world_size: int = 1, epoch: int = 0) -> int:
    """Optimizer steps in ``epoch`` for each of ``world_size`` ranks (one plan unit per step)."""
    return len(plan.epoch_batches(epoch)) // world_size


class ResumableBatchSampler(Sampler[list[int]]):
    """``DataLoader(batch_sampler=...)`` for one epoch of a plan: one rank's shard of its units, each cut into
    micro-batches of ``micro_batch`` images, from micro-batch ``start_batch`` on."""

    def __init__(
        self,
        plan: BatchPlan,
        epoch: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        micro_batch: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        units = shard_batches(plan.epoch_batches(epoch), rank, world_size)
        m = micro_batch or plan.batch_size
        self.batches = [unit[k : k + m] for unit in units for k in range(0, len(unit), m)]
        self.start_batch = max(0, start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches[self.start_batch :]

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start_batch)


class RunBatchSampler(Sampler[list[int]]):
    """The batch sampler of the run's one DataLoader: it yields whatever epoch position it was last given.

    A DataLoader asks its batch sampler for a new iterator each time it is iterated, in the main process, so
    moving this sampler to the next epoch (or to a smaller micro-batch after an out-of-memory error) is all
    it takes to keep one loader — and its persistent worker processes — for the whole run."""

    def __init__(self) -> None:
        self.current: ResumableBatchSampler | None = None

    def position(self, sampler: ResumableBatchSampler) -> None:
        self.current = sampler

    def __iter__(self) -> Iterator[list[int]]:
        if self.current is None:
            raise RuntimeError("RunBatchSampler.position() must be called before the loader is iterated")
        yield from self.current

    def __len__(self) -> int:
        return 0 if self.current is None else len(self.current)
