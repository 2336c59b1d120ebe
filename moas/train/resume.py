"""Resuming a run: the checkpoint to continue from, and the TrainState and parts rebuilt from it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from moas.checkpoint import load_checkpoint
from moas.errors import CheckpointError
from moas.train.parts import TrainingParts
from moas.train.rng import restore_rng_state
from moas.train.rotation import find_latest_checkpoint
from moas.train.state import TrainState

log = logging.getLogger("moas.train.loop")


def find_resume(checkpoint_dir: str, auto_resume: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """With ``auto_resume``: the newest verified checkpoint with optimizer state, and its contents."""
    ckpt_dir = Path(checkpoint_dir)
    path = find_latest_checkpoint(ckpt_dir) if auto_resume else None
    if auto_resume and path is None:
        light = find_latest_checkpoint(ckpt_dir, resumable_only=False)
        if light is not None:
            raise CheckpointError(
                f"No checkpoint with optimizer state in {ckpt_dir} verifies; {light.name} holds weights "
                "only. Move the folder aside to start over, or restore a newer checkpoint."
            )
    resume = load_checkpoint(path) if path else None
    if auto_resume and resume is None:
        log.info("--auto_resume: no valid checkpoint in %s; starting from scratch.", ckpt_dir)
    return path, resume


def resume_state(
    saved: dict[str, Any], path: Path, state: TrainState, parts: TrainingParts, rank: int, world_size: int
) -> tuple[TrainState, Path]:
    """Load ``saved`` into ``parts`` and return the TrainState it continues from, and its run folder.

    A mismatching model/optimizer or an RNG state that cannot be restored is a CheckpointError.
    """
    try:
        parts.load_state_dict(saved)
        state.epoch, state.global_step = int(saved["epoch"]), int(saved["global_step"])
        state.batch_pos = int(saved.get("batch_in_epoch", 0))
        state.micro_batch = int(saved.get("micro_batch", state.micro_batch))
        state.grad_accum = int(saved.get("grad_accum", state.grad_accum))
        state.skipped_steps = int(saved.get("skipped_steps", 0))
        parts.net.skipped = state.skipped_steps
    except (KeyError, RuntimeError, ValueError, TypeError):
        raise CheckpointError(
            f"Checkpoint {path} does not match this configuration; resume with the settings it was trained with."
        ) from None
    saved_world = int(saved.get("world_size", 1))
    if saved_world != world_size and state.batch_pos:
        # Same images, different sharding: convert the position through the images consumed.
        consumed = state.batch_pos * state.micro_batch * saved_world
        state.batch_pos = consumed // (state.micro_batch * world_size)
        state.batch_pos -= state.batch_pos % state.grad_accum  # continue at the start of a step
        log.warning(
            "Checkpoint was written by %d processes; position converted for %d.", saved_world, world_size
        )
    state.train_seconds_before = float(saved.get("train_seconds", 0.0))
    try:
        restore_rng_state(saved["rng"])
        if "train_rng" in saved:
            gens = saved["train_rng"]
            state.gen.set_state(gens[rank] if rank < len(gens) else gens[0])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"Checkpoint {path} has RNG states that cannot be restored: {exc}") from None
    log.info(
        "Resumed from %s at epoch %d, batch %d, step %d.",
        path,
        state.epoch,
        state.batch_pos,
        state.global_step,
    )
    return state, Path(saved.get("run_dir", ""))
