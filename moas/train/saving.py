"""Writing the trainer's checkpoints: the original's milestone epochs, and the save at the last optimizer-step
boundary followed by rotation and optimizer-state thinning. Split from ``moas.train.loop`` (the house rule
keeps files near 500 lines); ``Trainer.save`` calls :func:`save_trainer_checkpoint`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moas.checkpoint import epoch_checkpoint_name, save_checkpoint
from moas.errors import CheckpointError
from moas.train.rng import nonfinite_tensor
from moas.train.rotation import rotate_checkpoints, thin_optimizer_states
from moas.train.state import training_state

if TYPE_CHECKING:
    from moas.train.loop import Trainer

log = logging.getLogger("moas.train.loop")

MILESTONES_260 = (40, 80, 120, 160, 200, 230, 260)  # the original's milestone epochs of a 260-epoch run


def milestone_epochs(epochs: int) -> set[int]:
    """The original's milestones, scaled to this run's length; never rotated away."""
    return {max(1, round(m * epochs / 260)) for m in MILESTONES_260}


def _gather_gen_states(t: Trainer) -> list[torch.Tensor]:
    """Every rank's step-generator state at the boundary (each rank draws its own noise)."""
    state = t.boundary[2]
    if not t.dist.enabled:
        return [state]
    import torch.distributed as dist

    out: list = [None] * t.dist.world_size
    dist.all_gather_object(out, state)
    return out


def save_trainer_checkpoint(t: Trainer, name: str, kind: str = "checkpoint") -> Path | None:
    """Write ``name`` in the checkpoint folder from the last step boundary (rank 0; collective)."""
    epoch, batch_pos, _ = t.boundary
    gens = _gather_gen_states(t)  # every rank takes part; only rank 0 writes
    if not t.dist.is_main:
        return None
    bad = nonfinite_tensor({"model": t.model.state_dict(), "ema": t.ema.state_dict()})
    if bad:
        raise CheckpointError(
            f"Refusing to save {name}: {bad} holds NaN/Inf values; the previous checkpoints are kept."
        )
    state = training_state(t, kind, gens)
    state["domain"] = t.domain.state_dict()
    if delay := t.faults.save_delay():
        time.sleep(delay)
    meta = {
        "epoch": epoch,
        "batch_in_epoch": batch_pos,
        "global_step": t.global_step,
        "kind": kind,
        "train_seconds": round(state["train_seconds"], 2),
    }
    path = save_checkpoint(t.ckpt_dir / name, state, meta)
    # Rotation only now that the new checkpoint (and its sidecar) is complete.
    protect = {epoch_checkpoint_name(m) for m in t.milestones}
    rotate_checkpoints(t.ckpt_dir, keep=t.tc.keep_last, protect=protect)
    rotate_checkpoints(t.ckpt_dir, keep=t.tc.keep_last, pattern="checkpoint_*.pt")
    thin_optimizer_states(t.ckpt_dir, t.tc.keep_optimizer_last)
    log.info("Saved checkpoint %s (epoch %d, batch %d, step %d).", path, epoch, batch_pos, t.global_step)
    return path
