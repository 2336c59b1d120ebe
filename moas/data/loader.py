"""Builders that turn the ``[data]`` config into the training dataset, batch sampler and DataLoader.

DataLoader settings follow the original: ``workers = min(8, available threads, configured)``, the
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

from moas.config import MoasConfig
from moas.data.captions import CaptionAugment
from moas.data.dataset import ArtDataset, smart_collate_fn
from moas.data.sampler import BucketBatchSampler
from moas.errors import DataError

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


def model_divisor(cfg: MoasConfig) -> int:
    """Image sides must be divisible by this for the U-Net: patch_size * 2**(levels - 1)."""
    return cfg.model.patch_size * 2 ** (len(cfg.model.block_channels) - 1)


def build_dataset(cfg: MoasConfig, folder: str, encoder=None, progress: bool = True) -> ArtDataset:
    d = cfg.data
    ds = ArtDataset(
        folder,
        d.resolution,
        d.cache_dir,
        bucketing=d.bucketing,
        divisor=model_divisor(cfg),
        max_aspect=d.bucket_max_aspect,
        extract_style=d.extract_style,
        # Previous panels only matter to a model with panel memory (moas.models.panels).
        panel_context=cfg.train.panel_context
        if cfg.brain.conditioning == "moas" and cfg.brain.panel_memory
        else 0,
    )
    ds.validate(d.max_bad_fraction, progress=progress, report_dir=cfg.train.log_dir, encoder=encoder)
    return ds


def build_loader(
    cfg: MoasConfig, dataset: ArtDataset, batch_size: int, device: torch.device
) -> tuple[DataLoader, BucketBatchSampler]:
    sampler = BucketBatchSampler(dataset.bucket_ids, dataset.weights(), batch_size, seed=cfg.train.seed)
    if not sampler.epoch_batches(0):
        raise DataError(f"Every image in {dataset.root} has sample weight 0 (check the multiply.txt files).")
    workers = loader_workers(cfg.data.num_workers, cfg.resources.loader_workers)
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=smart_collate_fn, **loader_kwargs(workers, device)
    )
    log.info(
        "Loader: %d batches/epoch of %d from %d buckets, %d workers.",
        len(sampler),
        batch_size,
        len(set(dataset.bucket_ids)),
        workers,
    )
    return loader, sampler


def caption_augment(cfg: MoasConfig) -> CaptionAugment:
    d = cfg.data
    return CaptionAugment(d.keep_tokens, d.shuffle_tags, d.tag_dropout, d.caption_dropout)


def style_inputs(batch: dict, dropout: float, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's style token inputs, with ``dropout`` of the rows hidden (so no-style generation works)."""
    if "style" not in batch:
        return {}
    keep = batch["has_style"] & (torch.rand(batch["has_style"].shape[0]) >= dropout)  # (B,)
    return {"style": batch["style"].to(device), "style_mask": keep.to(device)}


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
