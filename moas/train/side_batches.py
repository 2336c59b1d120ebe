"""The images of the networks trained beside the generator (the enhancer, the super-resolution stage), fed like
the generator's: loaded ahead in DataLoader worker processes while the main thread trains.

* :func:`hr_dataset`: the training images at a side network's resolution, as a validated dataset with its own
  cache entries and RAM budget. It reuses the run's validation (the same files, skips and captions); each
  entry's key is derived from the main entry's, which already covers the file's content hash, so no file is
  hashed again. A missing entry is built on its first read, in a worker.
* :class:`SideBatches`: the batch of a network's step ``s``. The index stream is a pure function of (seed,
  stream name, ``s``): one seeded permutation of the images per pass, read ``batch_size`` at a time. A
  resumed run therefore continues with the very batches the straight run would have used, loading ahead
  draws nothing from the network's own ``torch.Generator`` (crops, timesteps, noise and degradations stay
  there, drawn on the main thread), and 0 or N workers give the same batches. The workers are spawned and
  persistent, as the main loader's (``moas.data.loader.loader_kwargs``); :meth:`SideBatches.close` stops them.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator, Sequence
from functools import lru_cache, partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from moas.data.cache import cache_key, entry_path
from moas.data.dataset import ArtDataset
from moas.data.loader import loader_kwargs


def hr_dataset(
    dataset: ArtDataset, resolution: int, ram_cache_bytes: int = 0, indices: list[int] | None = None
) -> ArtDataset:
    """``dataset``'s images (those at ``indices``: all by default) as square centre crops at ``resolution``,
    with the captions and the skips of ``dataset``'s validation (see the module docstring). Of a dataset
    that was never validated (a unit test's), a lazy view: each item is keyed, and its entry built, on first
    read, as ``ArtDataset`` does before validation."""
    keep = range(len(dataset)) if indices is None else indices
    hr = ArtDataset(
        dataset.root,
        resolution,
        dataset.cache_dir,
        captions_from_names=dataset.captions_from_names,
        ram_cache_bytes=ram_cache_bytes,
    )
    hr.paths = [dataset.paths[i] for i in keep]
    hr.bucket_ids = [0] * len(hr.paths)
    # ArtDataset keeps what validation found in private lists; they are read here rather than found again.
    if dataset._entries is None or dataset._captions is None:
        return hr
    hr._captions = [dataset._captions[i] for i in keep]
    hr._entries = [_side_entry(hr, dataset._entries[i], i_new) for i_new, i in enumerate(keep)]
    return hr


def _side_entry(hr: ArtDataset, main_entry, index: int):
    """The entry file of ``hr``'s image ``index``, keyed on the main entry's name (its content hash, the
    main settings and the caption); None without a disk cache."""
    if main_entry is None or hr.cache_dir is None:
        return None
    key = cache_key(main_entry.name, hr.buckets[0], hr.mode, hr._captions[index], hr.encoder_id)
    return entry_path(hr.cache_dir, hr.paths[index], key)


# --- the index stream ---------------------------------------------------------------------------------
def _pass_seed(seed: int, stream: str, n_pass: int) -> int:
    # hashlib, not hash(): str hashes are salted per process, and the stream must be the same in every run.
    digest = hashlib.sha256(f"{seed}/{stream}/{n_pass}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@lru_cache(maxsize=4)
def _pass_order(n: int, seed: int, stream: str, n_pass: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(_pass_seed(seed, stream, n_pass))
    return tuple(torch.randperm(n, generator=g).tolist())


def step_indices(n: int, batch_size: int, seed: int, stream: str, step: int) -> list[int]:
    """The images of step ``step``: positions ``step·batch_size …`` of the stream of per-pass permutations."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        n_pass, k = divmod(pos, n)
        out.append(_pass_order(n, seed, stream, n_pass)[k])
    return out


class StepBatchSampler(Sampler[list[int]]):
    """The batch sampler of a side network's loader: the batches of steps ``start``, ``start + 1``, … (endless).
    A DataLoader asks for a new iterator each time it is iterated, so moving ``start`` restarts it there."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: str) -> None:
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.start = 0

    def __iter__(self) -> Iterator[list[int]]:
        if self.n < 1 or self.batch_size < 1:
            raise ValueError("a side network's batches need at least one image")
        step = self.start
        while True:
            yield step_indices(self.n, self.batch_size, self.seed, self.stream, step)
            step += 1


def side_collate(items: list[dict], keys: Sequence[str] = ("pixels", "caption")) -> dict[str, Any]:
    """Items → a batch of ``keys`` only (each tensor crosses from a worker on its own, so the embeddings a
    side network does not use stay behind): tensors of one shape stacked (``pixels`` (B, 3, H, W) uint8),
    anything else listed. It needs no ``index``, so any dataset of ``pixels`` and ``caption`` items will do."""
    out: dict[str, Any] = {}
    for key in keys:
        values = [it[key] for it in items]
        same = all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values)
        out[key] = torch.stack(values) if same else values
    return out


def _ignore_interrupts(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the run finishes its step and saves (moas.train.faults), which
    # may need a batch, and then stops these workers itself (SideBatches.close).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class SideBatches:
    """The batch of each step of one side network (``stream`` names it in the index stream)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        stream: str,
        workers: int = 0,
        device: torch.device | None = None,
        keys: Sequence[str] = ("pixels", "caption"),  # what the batches hold of each item
    ) -> None:
        self.sampler = StepBatchSampler(len(dataset), batch_size, seed, stream)
        self.dataset, self.workers, self.keys = dataset, workers, tuple(keys)
        self._kwargs = loader_kwargs(workers, device or torch.device("cpu"))
        # The loader's own generator: its iterator draws a worker seed, which must not come from the global
        # stream (the generator step's) or the network's.
        self._seed = _pass_seed(seed, stream, -1)
        self._loader: DataLoader | None = None
        self._it: Iterator[dict] | None = None
        self._next = 0  # the step the iterator yields next
        self._last: tuple[int, dict] | None = None  # a step the guard skipped is redone on the same batch

    def start(self, step: int) -> None:
        """Load ahead from step ``step`` on: with workers, they start now rather than at the first batch."""
        if self._it is None or self._next != step:
            self._it = self._restart(step)
            self._next = step

    def batch(self, step: int) -> dict[str, Any]:
        """The batch of the network's step ``step`` (its step count: a resumed run continues the stream)."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        self.start(step)
        out = next(self._it)
        self._next = step + 1
        self._last = (step, out)
        return out

    def _restart(self, step: int) -> Iterator[dict]:
        """The loader iterated from ``step`` on (persistent workers drop what they had loaded ahead)."""
        if self._loader is None:
            self._loader = DataLoader(
                self.dataset,
                batch_sampler=self.sampler,
                collate_fn=partial(side_collate, keys=self.keys),
                generator=torch.Generator().manual_seed(self._seed),
                worker_init_fn=_ignore_interrupts,
                **self._kwargs,
            )
        self.sampler.start = step
        return iter(self._loader)

    def close(self) -> None:
        """Stop the worker processes now (the run's end, or an error), not whenever the loader is collected."""
        it, self._it, self._loader, self._last = self._it, None, None, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's own shutdown, as at garbage collection
        if shutdown is not None:
            shutdown()
