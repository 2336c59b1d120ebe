"""Writing a run's files: checkpoints at the last optimizer-step boundary (then rotation and the reduction
of older ones), the original's milestone epochs, and the model-file contents for generation.

A checkpoint holds: weights, EMA (with its update count), optimizer, schedule, GradScaler, the position of
the last boundary and the micro-batch split in use (``TrainState.position``), the process count, every RNG
state (the global ones plus each rank's step generator), the AdaptiveTrainingSystem state, the side
networks (``domain``), wall time, and what generation needs (config, constructor arguments, text-encoder
identity, run folder).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from moas.checkpoint import STEP_PATTERN, epoch_checkpoint_name, save_checkpoint
from moas.errors import CheckpointError
from moas.inference.model_card import link_model, save_model
from moas.inference.model_file import ModelFile, model_file_path, provenance
from moas.train.distributed import DistContext
from moas.train.faults import FaultInjector
from moas.train.parts import TrainingParts
from moas.train.rng import capture_rng_state, nonfinite_tensor
from moas.train.rotation import reduce_old_checkpoints, rotate_checkpoints, rotate_emergency_checkpoints
from moas.train.state import TrainState

log = logging.getLogger("moas.train.loop")

MILESTONES_260 = (40, 80, 120, 160, 200, 230, 260)  # the original's milestone epochs of a 260-epoch run


def milestone_epochs(epochs: int, keep: bool = True) -> set[int]:
    """The original's milestones, scaled to this run's length; never rotated away. Empty when ``keep`` is
    off (``train.milestones``: a short run has no use for seven archival checkpoints)."""
    return {max(1, round(m * epochs / 260)) for m in MILESTONES_260} if keep else set()


@dataclass
class RunRecord:
    """What every file of a run records about it."""

    config: dict[str, Any]  # the resolved MoasConfig as a dict
    text_encoder: str
    run_dir: Path
    data_dir: str
    seed: int
    style_db: dict | None = None  # the artist style database, when styles are trained
    data_summary: dict = field(default_factory=dict)  # moas.data.summary: images, captions, tags, weights
    hardware: str = ""
    base_model: dict | None = None  # the --init_from model, for a fine-tuned run


@dataclass
class CheckpointPolicy:
    directory: Path
    keep_last: int  # epoch_*.pt (and checkpoint_*.pt) files kept
    keep_optimizer_last: int  # newest checkpoints that keep optimizer state (0 = all)
    milestones: set[int]
    old_checkpoint: str = "thinned"  # what older ones keep: full | thinned | ema_bf16
    keep_emergency: int = 2  # emergency_*.pt files kept

    @classmethod
    def of(cls, train: Any) -> CheckpointPolicy:
        """From the ``train.*`` settings of these names (a ``TrainConfig``)."""
        return cls(
            Path(train.checkpoint_dir),
            train.keep_last,
            train.keep_optimizer_last,
            milestone_epochs(train.epochs, train.milestones),
            train.old_checkpoint,
            train.keep_emergency,
        )


def checkpoint_contents(
    state: TrainState,
    parts: TrainingParts,
    record: RunRecord,
    kind: str,
    gens: list[torch.Tensor],
    world: int,
) -> dict[str, Any]:
    """The full resumable state at ``state``'s last boundary (``gens``: every rank's generator)."""
    return {
        "kind": kind,
        "train_seconds": state.train_seconds(),
        **parts.state_dict(),
        **state.position(),
        "world_size": world,
        "batch_plan": {"kind": "buckets", "seed": record.seed},
        "rng": capture_rng_state(),
        "train_rng": gens,
        "config": record.config,
        "model_args": parts.model.init_args,
        "text_encoder": record.text_encoder,
        "run_dir": str(record.run_dir),
        "domain": parts.side.state_dict() if parts.frozen is None else {},
        **({"sr": parts.sr.state_dict()} if parts.sr is not None else {}),
    }


def _gather_gen_states(state: TrainState, dist: DistContext) -> list[torch.Tensor]:
    """Every rank's step-generator state at the boundary (each rank draws its own noise)."""
    gen_state = state.boundary.gen_state
    if not dist.enabled:
        return [gen_state]
    import torch.distributed as tdist

    out: list = [None] * dist.world_size
    tdist.all_gather_object(out, gen_state)
    return out


def save_at_boundary(
    name: str,
    kind: str,
    state: TrainState,
    parts: TrainingParts,
    record: RunRecord,
    policy: CheckpointPolicy,
    dist: DistContext,
    faults: FaultInjector,
) -> Path | None:
    """Write ``name`` in the checkpoint folder from the last step boundary (rank 0 writes; collective)."""
    gens = _gather_gen_states(state, dist)  # every rank takes part; only rank 0 writes
    if not dist.is_main:
        return None
    bad = nonfinite_tensor({"model": parts.model.state_dict(), "ema": parts.ema.state_dict()})
    if bad:
        raise CheckpointError(
            f"Refusing to save {name}: {bad} holds NaN/Inf values; the previous checkpoints are kept."
        )
    contents = checkpoint_contents(state, parts, record, kind, gens, dist.world_size)
    if delay := faults.save_delay():
        time.sleep(delay)
    b = state.boundary
    meta = {
        "epoch": b.epoch,
        "batch_in_epoch": b.batch_pos,
        "global_step": state.global_step,
        "kind": kind,
        "train_seconds": round(contents["train_seconds"], 2),
    }
    path = save_checkpoint(policy.directory / name, contents, meta)
    # Rotation only now that the new checkpoint (and its sidecar) is complete.
    protect = {epoch_checkpoint_name(m) for m in policy.milestones}
    rotate_checkpoints(policy.directory, keep=policy.keep_last, protect=protect)
    rotate_checkpoints(policy.directory, keep=policy.keep_last, pattern=STEP_PATTERN)
    rotate_emergency_checkpoints(policy.directory, policy.keep_emergency)
    reduce_old_checkpoints(policy.directory, policy.keep_optimizer_last, policy.old_checkpoint)
    log.info(
        "Saved checkpoint %s (epoch %d, batch %d, step %d).", path, b.epoch, b.batch_pos, state.global_step
    )
    return path


def model_file_contents(state: TrainState, parts: TrainingParts, record: RunRecord) -> ModelFile:
    """What generation needs now: the EMA weights, the constructor arguments, config, text encoder, the
    trained enhancer, and where the weights come from. With the stage alone: the base model, unchanged,
    with the stage's EMA weights and settings."""
    enhancer, sr = parts.side.enhancer, parts.sr
    if parts.frozen is not None:
        config = {**parts.frozen.config, "sr": record.config["sr"]}
        sr_weights = sr.ema.model.state_dict()
        return replace(parts.frozen, sr_args=sr.model.init_args, sr_weights=sr_weights, config=config)
    return ModelFile(
        model_args=parts.model.init_args,
        weights=parts.ema.model.state_dict(),
        config=record.config,
        text_encoder=record.text_encoder,
        enhancer_args=enhancer.init_args if enhancer is not None else None,
        enhancer_weights=enhancer.state_dict() if enhancer is not None else None,
        sr_args=sr.model.init_args if sr is not None else None,
        sr_weights=sr.ema.model.state_dict() if sr is not None else None,
        style_db=record.style_db,
        provenance=provenance(
            state.epoch,
            state.global_step,
            state.train_seconds(),
            record.data_dir,
            str(record.run_dir),
            record.seed,
        )
        | {
            "data": record.data_summary,
            "hardware": record.hardware,
            "base_model": record.base_model,
            "sample_grid": newest_sample_grid(record.run_dir),
        },
    )


def write_final_models(
    paths: tuple[Path, Path], contents: ModelFile, keeper, global_step: int, stage_only: bool = False
) -> None:
    """The end of a run: the last weights go to the last-model file; the model for generation keeps the
    best-scoring checkpoint's weights (``keeper``: a BestModelKeeper or None), or gets the last ones when
    selection is off or never ran. When the best is the last step the two are one file under two names
    (a hard link where the file system has them): same weights, no second copy on disk. ``stage_only``
    (``--stage sr``): only the model file, so the base run's last-model file beside it stays its own."""
    model_path, last_path = paths
    if stage_only:
        save_model(model_path, contents)
        return
    best = keeper.best if keeper is not None else None
    if best is None or not model_path.is_file():
        save_model(last_path, contents)
        save_model(model_path, contents)
        return
    if best["global_step"] == global_step:
        link_model(last_path, model_path, contents)
    else:
        save_model(last_path, contents)
    log.info("Best checkpoint: epoch %d (%s %s).", best["epoch"], keeper.metric, keeper.best_score)


def newest_sample_grid(run_dir: Path) -> str | None:
    """The run's newest sample grid (``samples/epoch_*.png``), for the model card."""
    grids = sorted(Path(run_dir).glob("samples/epoch_*.png"))
    return str(grids[-1]) if grids else None


def model_paths(save_path: str) -> tuple[Path, Path]:
    """(the model for generation, the last weights): ``.safetensors`` files, ``last_model`` beside the
    save path (``final_model`` if the save path is itself called last_model)."""
    model_path = model_file_path(save_path)
    if model_path != Path(save_path):
        log.info("Model files are .safetensors: %s is written as %s.", save_path, model_path)
    stem = "last_model" if model_path.stem != "last_model" else "final_model"
    return model_path, model_path.with_name(stem + model_path.suffix)
