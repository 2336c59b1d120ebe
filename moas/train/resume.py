"""Where a run starts from: its own checkpoint, or another model's weights.

**Resume** (``--auto_resume``): the newest verified checkpoint with optimizer state; the parts, the
TrainState and every random stream are rebuilt from it, so the run continues bit for bit.

**Start from a model** (``moas train --init_from MODEL``, fine-tuning): a new run that starts from a trained
model's weights. Only the weights come over — the generator's (the model file holds its EMA weights, which
become both the trained and the averaged copy) and the enhancer's when both sides have one. The optimizer,
the lr schedule, the step count and the run folder are new. The architecture and the text encoder must be
the base model's; the resolution may differ (the U-Net is convolutional), so a character can be fine-tuned
at another size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from moas.checkpoint import load_checkpoint
from moas.errors import CheckpointError
from moas.inference.model_file import ModelFile, read_model_file
from moas.io import short_hash
from moas.models.upgrade import upgrade_model_args
from moas.train.parts import TrainingParts
from moas.train.rng import restore_rng_state
from moas.train.rotation import find_latest_checkpoint
from moas.train.state import TrainState

log = logging.getLogger("moas.train.loop")


# --- resume ---------------------------------------------------------------------------------------


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


# --- start from a trained model -------------------------------------------------------------------

# Constructor arguments that may differ between a base model and its fine-tuned run.
FREE_ARGS = ("resolution",)


def read_base_model(path: str | Path) -> ModelFile:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"--init_from {p}: no such model file.")
    return read_model_file(p)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


def architecture_differences(base_args: dict[str, Any], run_args: dict[str, Any]) -> list[str]:
    """``name: base → run`` for every constructor argument that differs (FREE_ARGS excepted)."""
    a = _flat({k: v for k, v in upgrade_model_args(base_args).items() if k not in FREE_ARGS})
    b = _flat({k: v for k, v in run_args.items() if k not in FREE_ARGS})
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def check_compatible(base: ModelFile, path: str | Path, run_args: dict[str, Any]) -> None:
    """One CheckpointError when the run cannot start from ``base`` (the text encoder is checked when it
    loads: the run requires the base model's)."""
    diff = architecture_differences(base.model_args, run_args)
    if diff:
        shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
        raise CheckpointError(
            f"--init_from {path} has another architecture than this run ({shown}); train with the "
            "base model's profile and config (printed by moas inspect --model)."
        )


def load_base_weights(model: torch.nn.Module, base: ModelFile, path: str | Path) -> None:
    try:
        model.load_state_dict(base.weights)
    except RuntimeError:
        raise CheckpointError(f"--init_from {path}: its weights do not fit this run's generator.") from None


def load_base_enhancer(enhancer: torch.nn.Module | None, base: ModelFile) -> bool:
    """The base model's trained enhancer into the run's, when both exist with the same shape."""
    if enhancer is None or base.enhancer_weights is None or base.enhancer_args != enhancer.init_args:
        return False
    enhancer.load_state_dict(base.enhancer_weights)
    return True


def base_record(path: str | Path, base: ModelFile | None) -> dict[str, Any]:
    """What the fine-tuned model's files say about their base (``base`` None: a resumed run, which knows
    its base by path, and by hash while the file is still there)."""
    if base is None:
        return {"path": str(path), "hash": short_hash(path) if Path(path).is_file() else None}
    prov = base.provenance
    return {
        "path": str(path),
        "hash": short_hash(path),
        "data_dir": prov.get("data_dir"),
        "epoch": prov.get("epoch"),
        "base_model": prov.get("base_model"),  # a chain of fine-tunes stays readable
    }
