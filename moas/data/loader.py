"""DataLoader settings, and the style database written beside a run.

They follow the original: ``workers = min(8, available threads, configured)``, the
``spawn`` start method whenever workers are used (no CUDA or tokenizer state forked into workers),
``pin_memory`` on CUDA, persistent workers and ``prefetch_factor = 2`` when more than 2 GB of RAM is
free. With 0 workers everything runs in the main process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader

from moas.data.dataset import ArtDataset, smart_collate_fn

log = logging.getLogger(__name__)

MAX_WORKERS = 8  # the original's min(8, available_threads)


def available_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def loader_workers(requested: int, limit: int = MAX_WORKERS) -> int:
    return max(0, min(MAX_WORKERS, limit, available_threads(), requested))


def loader_kwargs(workers: int, device: torch.device) -> dict:
    """DataLoader keyword arguments for ``workers`` processes on ``device`` (see module docstring)."""
    kw: dict = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kw["multiprocessing_context"] = "spawn"
        kw["persistent_workers"] = True
        kw["prefetch_factor"] = 2 if psutil.virtual_memory().available > 2 * 1024**3 else 1
    return kw


def batch_loader(dataset: ArtDataset, batch_sampler, workers: int, device: torch.device) -> DataLoader:
    """A DataLoader of ``dataset`` over ``batch_sampler``'s batches with ``workers`` spawned, persistent
    worker processes (they live as long as the loader)."""
    return DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=smart_collate_fn, **loader_kwargs(workers, device)
    )


def save_style_db(dataset: ArtDataset, run_dir: Path) -> Path | None:
    if not dataset.extract_style:
        return None
    path = dataset.style_db.save(run_dir / "style_db.json")
    log.info(
        "Style database: %d styles (%s) → %s.",
        len(dataset.style_db),
        ", ".join(dataset.style_db.names()),
        path,
    )
    return path
