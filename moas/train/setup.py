"""Pieces of ``Trainer.__init__`` and ``Trainer._finish`` that read or write files: the checkpoint to resume
from, the training data (text encoder, dataset, validation split, text bank), the resource report, and the
model files written at the end. Split from ``moas.train.loop`` to keep it readable.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moas.checkpoint import load_checkpoint, save_checkpoint
from moas.config import MoasConfig, TrainConfig
from moas.data.dataset import ArtDataset
from moas.data.loader import build_dataset
from moas.errors import CheckpointError, MoasError
from moas.eval.validate import split_holdout
from moas.resources import EnhancedResourceManager
from moas.text.bank import TextBank
from moas.text.encoder import TextEncoder
from moas.train.rotation import find_latest_checkpoint

if TYPE_CHECKING:
    from moas.train.loop import Trainer

log = logging.getLogger("moas.train.loop")


def find_resume(tc: TrainConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """With ``auto_resume``: the newest verified checkpoint with optimizer state, and its contents."""
    ckpt_dir = Path(tc.checkpoint_dir)
    path = find_latest_checkpoint(ckpt_dir) if tc.auto_resume else None
    if tc.auto_resume and path is None:
        light = find_latest_checkpoint(ckpt_dir, resumable_only=False)
        if light is not None:
            raise CheckpointError(
                f"No checkpoint with optimizer state in {ckpt_dir} verifies; {light.name} holds weights "
                "only. Move the folder aside to start over, or restore a newer checkpoint."
            )
    resume = load_checkpoint(path) if path else None
    if tc.auto_resume and resume is None:
        log.info("--auto_resume: no valid checkpoint in %s; starting from scratch.", ckpt_dir)
    return path, resume


@dataclass
class TrainingData:
    encoder: TextEncoder
    dataset: ArtDataset
    val_set: ArtDataset | None
    captions: list[str]
    bank: TextBank


def load_training_data(
    cfg: MoasConfig, resume: dict | None, progress: bool, device: object, threads: int
) -> TrainingData:
    """Text encoder (first: validation can embed captions with it), dataset, validation set, text bank."""
    encoder = TextEncoder(
        cfg.text.model_name,
        max_tokens=cfg.text.max_tokens,
        require_id=resume["text_encoder"] if resume else None,
    )
    dataset = build_dataset(cfg, cfg.data.data_dir, encoder, progress)
    log.info(
        "Data: %d images in %s (%d skipped); device %s, %d threads.",
        len(dataset),
        cfg.data.data_dir,
        len(dataset.skipped),
        device,
        threads,
    )
    val_set = None
    if cfg.data.val_dir:
        val_set = build_dataset(cfg, cfg.data.val_dir, encoder, progress)
        log.info("Validation: %d images in %s.", len(val_set), cfg.data.val_dir)
    else:  # hold out a seed-fixed slice of the training folder (excluded from training)
        dataset, val_set = split_holdout(
            dataset, cfg.monitor.val_fraction, cfg.train.seed, cfg.monitor.val_min_images
        )
        if val_set is not None:
            log.info("Validation: %d images held out of %s.", len(val_set), cfg.data.data_dir)
    captions = dataset.captions()
    val_captions = val_set.captions() if val_set else []
    bank = TextBank(encoder, captions + val_captions, progress=progress)
    return TrainingData(encoder, dataset, val_set, captions, bank)


def log_resources(resources: EnhancedResourceManager, cfg: MoasConfig) -> None:
    snap = resources.snapshot()
    log.info(
        "Resources: RAM %.1f GB available (process %.1f GB, page cache %.1f GB)%s; "
        "resolution-table batch at %d px: %d.",
        snap.ram_available_gb,
        snap.process_rss_gb,
        snap.page_cache_gb,
        f", VRAM {snap.vram_free_gb:.1f} of {snap.vram_total_gb:.1f} GB free" if resources.cuda else "",
        cfg.data.resolution,
        resources.resolution_batch(cfg.train.batch_size, cfg.data.resolution),
    )


def _module_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def checkpoint_size_estimate(t: Trainer) -> tuple[int, int]:
    """(bytes of a resumable checkpoint, bytes once its optimizer state is thinned away), estimated.

    Weights and the EMA copy, plus AdamW's two (three with AMSGrad) tensors per trainable weight, for the
    generator and the discriminator/enhancer when they train. Within a few per cent of the real files.
    """
    side = [m for m in (t.domain.disc, t.domain.enhancer) if m is not None]
    generator = _module_bytes(t.model)
    thinned = 2 * generator + sum(_module_bytes(m) for m in side)  # the generator has an EMA copy
    moments = 3 if t.tc.amsgrad else 2
    optimizer = moments * _param_bytes(t.model) + 3 * sum(_param_bytes(m) for m in side)  # side: AMSGrad
    return thinned + optimizer, thinned


def check_disk_space(t: Trainer) -> None:
    """Before training: say what the checkpoints will take, fail at once if not even one fits (rather than
    at the end of the first epoch), and warn when the kept set (``keep_last``, milestones, model files)
    will not fit, so the user can free space or move ``--checkpoint_dir`` before hours of training."""
    tc = t.tc
    full, thinned = checkpoint_size_estimate(t)
    t.ckpt_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(t.ckpt_dir).free
    saves = tc.epochs // max(tc.save_every, 1) + len(t.milestones)
    kept = min(saves, tc.keep_last + len(t.milestones))
    resumable = kept if tc.keep_optimizer_last == 0 else min(kept, tc.keep_optimizer_last)
    # +1 full: a checkpoint is written beside the old ones before rotation deletes any.
    need = (resumable + 1) * full + (kept - resumable) * thinned + 2 * thinned
    gb = 1024**3
    log.info(
        "Checkpoints: about %.2f GB each (%.2f GB once thinned); up to %d kept need about %.1f GB; "
        "%.1f GB free in %s.",
        full / gb,
        thinned / gb,
        kept,
        need / gb,
        free / gb,
        t.ckpt_dir,
    )
    if free < full:
        raise MoasError(
            f"Only {free / gb:.2f} GB is free in {t.ckpt_dir} but one checkpoint needs about {full / gb:.2f} GB; "
            "free some space or point --checkpoint_dir at a larger disk."
        )
    if free < need:
        log.warning(
            "The kept checkpoints may not fit: about %.1f GB needed, %.1f GB free in %s. Lower "
            "train.keep_last / train.keep_optimizer_last or free space; a failed save stops training "
            "with the earlier checkpoints intact.",
            need / gb,
            free / gb,
            t.ckpt_dir,
        )


def model_paths(save_path: str) -> tuple[Path, Path]:
    """(the model for generation, the last weights): ``last_model.pt`` beside it (``final_model.pt`` if
    the save path is itself called last_model.pt)."""
    model_path = Path(save_path)
    last_name = "last_model.pt" if model_path.name != "last_model.pt" else "final_model.pt"
    return model_path, model_path.with_name(last_name)


def write_model_files(t: Trainer, model_path: Path, last_path: Path) -> None:
    """Rank 0 at the end: the last weights always go to ``last_path``; ``model_path`` holds the best-scoring
    checkpoint's weights (or the last ones when best-step selection is off or never ran)."""
    model_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"epoch": t.epoch, "global_step": t.global_step, "kind": "model"}
    state = t._model_state()
    save_checkpoint(last_path, state, meta)
    keeper = t.monitor.keeper
    if keeper is None or keeper.best is None or not model_path.is_file():
        save_checkpoint(model_path, state, meta)
    elif keeper.best is not None:
        log.info("Best checkpoint: epoch %d (%s %s).", keeper.best["epoch"], keeper.metric, keeper.best_score)
    if t.cfg.data.extract_style:  # also beside the model file, readable without torch
        t.dataset.style_db.save(model_path.with_name(model_path.stem + ".styles.json"))
    t.monitor.close()
    log.info("Model for generation saved to %s (run folder %s).", model_path, t.run_dir)
