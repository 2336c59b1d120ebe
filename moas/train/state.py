"""What a training checkpoint holds, and how a Trainer is rebuilt from one.

A checkpoint is taken at an optimizer-step boundary and holds: weights, EMA (with its update count),
optimizer, schedule, GradScaler, epoch and batch position inside the epoch (the batch plan is a pure
function of seed and epoch, so nothing else about the data order is needed), the micro-batch and
accumulation in use (they change after an out-of-memory recovery), the process count, every RNG state
(global ones plus each rank's training-step generator), the AdaptiveTrainingSystem state, wall time, and
what generation needs (config, constructor arguments, text-encoder identity, run folder).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moas.config import MoasConfig
from moas.errors import CheckpointError
from moas.train.ema import EMA
from moas.train.optim import load_optimizer_state
from moas.train.rng import capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    from moas.models.generator import MoasGenerator
    from moas.train.loop import Trainer

log = logging.getLogger(__name__)
error_log = logging.getLogger("moas.errors")


def step_checkpoint_name(step: int) -> str:
    """Mid-epoch checkpoints (``save_every_steps``, signals, ``max_steps``): ``checkpoint_00000120.pt``."""
    return f"checkpoint_{step:08d}.pt"


def model_file_state(
    model: MoasGenerator,
    ema: EMA,
    cfg: MoasConfig,
    encoder_id: str,
    epoch: int,
    step: int,
    style_db: dict | None = None,
) -> dict:
    """What generation needs: the EMA weights, the constructor arguments, config and text-encoder identity."""
    return {
        **({"style_db": style_db} if style_db else {}),
        "kind": "model",
        "model_args": model.init_args,
        "ema": {"model": ema.model.state_dict()},
        "config": cfg.to_dict(),
        "text_encoder": encoder_id,
        "epoch": epoch,
        "global_step": step,
    }


def training_state(t: Trainer, kind: str, gens: list[torch.Tensor]) -> dict[str, Any]:
    """The full resumable state at the trainer's last step boundary (``gens``: every rank's generator)."""
    epoch, batch_pos, _ = t.boundary
    return {
        "kind": kind,
        "train_seconds": t.train_seconds(),
        "model": t.model.state_dict(),
        "ema": t.ema.state_dict(),
        "optimizer": t.opt.state_dict(),
        "scheduler": t.sched.state_dict(),
        "scaler": t.scaler.state_dict(),
        "epoch": epoch,
        "batch_in_epoch": batch_pos,
        "global_step": t.global_step,
        "skipped_steps": t.skipped_steps,
        "micro_batch": t.micro_batch,
        "grad_accum": t.grad_accum,
        "world_size": t.dist.world_size,
        "batch_plan": {"kind": "uniform", "seed": t.tc.seed},
        "rng": capture_rng_state(),
        "train_rng": gens,
        "adaptive": t.adaptive.state_dict() if t.adaptive else {},
        "config": t.cfg.to_dict(),
        "model_args": t.model.init_args,
        "text_encoder": t.encoder.encoder_id,
        "run_dir": str(t.run_dir),
    }


def restore_training_state(t: Trainer, state: dict[str, Any]) -> Path:
    """Load ``state`` into the trainer; returns the run folder it was written from.

    A mismatching model/optimizer or an RNG state that cannot be restored is a CheckpointError.
    """
    try:
        t.model.load_state_dict(state["model"])
        t.ema.load_state_dict(state["ema"])
        load_optimizer_state(t.opt, state["optimizer"])
        t.sched.load_state_dict(state["scheduler"])
        t.scaler.load_state_dict(state["scaler"])
        t.epoch, t.global_step = int(state["epoch"]), int(state["global_step"])
        t.batch_pos = int(state.get("batch_in_epoch", 0))
        t.micro_batch = int(state.get("micro_batch", t.micro_batch))
        t.grad_accum = int(state.get("grad_accum", t.grad_accum))
        t.skipped_steps = int(state.get("skipped_steps", 0))
        if t.adaptive is not None and "adaptive" in state:
            t.adaptive.load_state_dict(state["adaptive"])
    except (KeyError, RuntimeError, ValueError, TypeError):
        raise CheckpointError(
            f"Checkpoint {t.resume_path} does not match this configuration; resume with the settings it was trained with."
        ) from None
    saved_world = int(state.get("world_size", 1))
    if saved_world != t.dist.world_size and t.batch_pos:
        # Same images, different sharding: convert the position through the images consumed.
        consumed = t.batch_pos * t.micro_batch * saved_world
        t.batch_pos = consumed // (t.micro_batch * t.dist.world_size)
        log.warning(
            "Checkpoint was written by %d processes; position converted for %d.",
            saved_world,
            t.dist.world_size,
        )
    t.train_seconds_before = float(state.get("train_seconds", 0.0))
    try:
        restore_rng_state(state["rng"])
        if "train_rng" in state:
            gens = state["train_rng"]
            t.gen.set_state(gens[t.dist.rank] if t.dist.rank < len(gens) else gens[0])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"Checkpoint {t.resume_path} has RNG states that cannot be restored: {exc}"
        ) from None
    log.info(
        "Resumed from %s at epoch %d, batch %d, step %d.",
        t.resume_path,
        t.epoch,
        t.batch_pos,
        t.global_step,
    )
    return Path(state.get("run_dir", ""))


def emergency_save(t: Trainer, exc: BaseException) -> None:
    """An unrecoverable error: write ``emergency_epoch_<N>.pt`` from the last boundary, then re-raise."""
    name = f"emergency_epoch_{t.boundary[0] + 1:04d}.pt"
    try:
        path = t.save(name, kind="emergency")
        status = f"emergency checkpoint {path} saved"
    except Exception as save_exc:  # the original error matters more; report both
        status = f"emergency checkpoint failed too ({save_exc})"
    error_log.error(
        "Unrecoverable error at epoch %d, step %d: %s: %s; %s.",
        t.epoch + 1,
        t.global_step,
        type(exc).__name__,
        exc,
        status,
        exc_info=exc,
    )
