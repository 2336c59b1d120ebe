"""Disk space for checkpoints: what one takes, and whether the kept set fits, checked before training.

A disk that fills up hours into a run loses nothing (saves are atomic) but stops the run; so the check
says up front what the checkpoints will take, fails at once when not even one fits, and warns when the
kept set (``keep_last``, milestones, model files) will not.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from moas.errors import MoasError

log = logging.getLogger("moas.train.loop")
GB = 1024**3


def _module_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def checkpoint_size_estimate(
    model: torch.nn.Module, side: list[torch.nn.Module], amsgrad: bool
) -> tuple[int, int]:
    """(bytes of a resumable checkpoint, bytes once its optimizer state is thinned away), estimated.

    Weights and the EMA copy, plus AdamW's two (three with AMSGrad) tensors per trainable weight, for the
    generator and the ``side`` networks (discriminator, enhancer; AMSGrad). Within a few per cent of the
    real files.
    """
    generator = _module_bytes(model)
    thinned = 2 * generator + sum(_module_bytes(m) for m in side)  # the generator has an EMA copy
    moments = 3 if amsgrad else 2
    optimizer = moments * _param_bytes(model) + 3 * sum(_param_bytes(m) for m in side)
    return thinned + optimizer, thinned


def check_disk_space(
    directory: Path,
    sizes: tuple[int, int],
    epochs: int,
    save_every: int,
    keep_last: int,
    keep_optimizer_last: int,
    milestones: int,
) -> None:
    """Log what the checkpoints will take; stop with one sentence if one cannot fit; warn if the kept set
    will not. ``sizes`` is :func:`checkpoint_size_estimate`; ``milestones`` the count of milestone epochs."""
    full, thinned = sizes
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    saves = epochs // max(save_every, 1) + milestones
    kept = min(saves, keep_last + milestones)
    resumable = kept if keep_optimizer_last == 0 else min(kept, keep_optimizer_last)
    # +1 full: a checkpoint is written beside the old ones before rotation deletes any.
    need = (resumable + 1) * full + (kept - resumable) * thinned + 2 * thinned
    log.info(
        "Checkpoints: about %.2f GB each (%.2f GB once thinned); up to %d kept need about %.1f GB; "
        "%.1f GB free in %s.",
        full / GB,
        thinned / GB,
        kept,
        need / GB,
        free / GB,
        directory,
    )
    if free < full:
        raise MoasError(
            f"Only {free / GB:.2f} GB is free in {directory} but one checkpoint needs about {full / GB:.2f} GB; "
            "free some space or point --checkpoint_dir at a larger disk."
        )
    if free < need:
        log.warning(
            "The kept checkpoints may not fit: about %.1f GB needed, %.1f GB free in %s. Lower "
            "train.keep_last / train.keep_optimizer_last or free space; a failed save stops training "
            "with the earlier checkpoints intact.",
            need / GB,
            free / GB,
            directory,
        )
