"""``moas train --stage sr``: train the super-resolution stage alone and add it to an existing model file.

The base model (``--init_from``, else the model at ``--save_path``) is only read: its generator, enhancer
and configuration are kept and the trained stage is written beside them into ``--save_path``. The stage
trains on the data folder's images exactly as it does beside the generator (``moas.train.sr_stage``): the
same crops, conditioning and objective, for ``--max_steps`` steps or ``--epochs`` passes over the images.

Resumable: a checkpoint ``<checkpoint_dir>/sr/sr_step_<N>.pt`` (the stage's weights, EMA, optimizer and
random stream) is written every ``train.save_every_steps`` steps (or every 200), on Ctrl-C / SIGTERM and at
the end; ``--auto_resume`` continues from the newest one bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from moas.checkpoint import SR_STAGE_PATTERN, load_checkpoint, save_checkpoint, sr_stage_checkpoint_name
from moas.config import MoasConfig, deep_merge
from moas.device import seed_everything
from moas.errors import MoasError
from moas.inference.model_file import read_model_file, write_model_file
from moas.train.builders import build_runtime, build_sr_stage
from moas.train.data_setup import build_data
from moas.train.faults import GracefulStop, TrainingInterrupted
from moas.train.rotation import find_latest_checkpoint, rotate_checkpoints
from moas.train.sr_stage import SRStageTraining

log = logging.getLogger(__name__)

DEFAULT_SAVE_EVERY = 200
MAX_SKIPS_IN_A_ROW = 20  # a stage whose loss stays non-finite this long will not recover by itself
KEEP = 2  # stage checkpoints kept


def base_model_path(cfg: MoasConfig) -> Path:
    path = Path(cfg.train.init_from or cfg.train.save_path)
    if not path.is_file():
        raise MoasError(
            f"--stage sr adds a super-resolution stage to a trained model, and there is none at {path}; "
            "train the base model first or name it with --init_from."
        )
    return path


def total_steps(cfg: MoasConfig, n_images: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return cfg.train.epochs * max(1, math.ceil(n_images / cfg.sr.batch_size))


def _save(stage: SRStageTraining, directory: Path, seconds: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(
        directory / sr_stage_checkpoint_name(stage.steps),
        {"sr": stage.state_dict(), "train_seconds": seconds},
        {"global_step": stage.steps, "kind": "sr"},
    )
    rotate_checkpoints(
        directory, keep=KEEP, pattern=SR_STAGE_PATTERN
    )  # only now that the new one is complete
    return path


def train_sr(cfg: MoasConfig, progress: bool = True) -> Path:
    """Train the stage as ``cfg`` says and write the base model with it to ``train.save_path``."""
    base_path = base_model_path(cfg)
    base = read_model_file(base_path)
    saved = base.config.get("data", {}).get("resolution")
    if saved is not None and saved != cfg.data.resolution:
        log.info("Base resolution %s from %s (not the profile's %d).", saved, base_path, cfg.data.resolution)
        cfg = MoasConfig.from_dict(deep_merge(cfg.to_dict(), {"data": {"resolution": saved}}))
    cfg = MoasConfig.from_dict(deep_merge(cfg.to_dict(), {"sr": {"train": True}}))
    runtime = build_runtime(cfg)
    seed_everything(cfg.train.seed)  # the stage's initial weights
    data = build_data(cfg, base.text_encoder, progress, runtime)
    stage = build_sr_stage(cfg, data, runtime.device, runtime.amp_dtype)
    directory = Path(cfg.train.checkpoint_dir) / "sr"
    seconds = 0.0
    latest = (
        find_latest_checkpoint(directory, patterns=(SR_STAGE_PATTERN,)) if cfg.train.auto_resume else None
    )
    if latest is not None:
        state = load_checkpoint(latest)
        stage.load_state_dict(state["sr"])
        seconds = float(state.get("train_seconds", 0.0))
        log.info("Resumed the super-resolution stage from %s (step %d).", latest, stage.steps)
    total = total_steps(cfg, len(data.dataset))
    every = cfg.train.save_every_steps or DEFAULT_SAVE_EVERY
    start = time.perf_counter() - seconds
    with GracefulStop() as stopper:
        bar = tqdm(
            total=total, initial=stage.steps, desc="super-resolution", unit="step", disable=not progress
        )
        in_a_row = 0
        while stage.steps < total:
            scalars = stage.step()
            in_a_row = 0 if scalars else in_a_row + 1
            if in_a_row >= MAX_SKIPS_IN_A_ROW:
                path = _save(stage, directory, time.perf_counter() - start)
                raise MoasError(
                    f"The super-resolution stage's loss or gradient was not finite for {in_a_row} steps in a "
                    f"row (at its step {stage.steps}); checkpoint {path} was saved. Lower sr.lr, or train "
                    'with train.mixed_precision = "auto" (fp32 on the CPU), then resume with --auto_resume.'
                )
            if scalars:
                bar.update(1)
                bar.set_postfix(loss=f"{scalars['sr/loss']:.4f}")
            if stopper.signum:
                path = _save(stage, directory, time.perf_counter() - start)
                raise TrainingInterrupted(
                    f"Stopped by signal {stopper.signum} at super-resolution step {stage.steps}; checkpoint "
                    f"{path} was saved; rerun the same command with --auto_resume to continue.",
                    stopper.signum,
                )
            if scalars and stage.steps % every == 0:
                _save(stage, directory, time.perf_counter() - start)
        bar.close()
    _save(stage, directory, time.perf_counter() - start)
    base.sr_args, base.sr_weights = stage.model.init_args, stage.ema.model.state_dict()
    base.config = {**base.config, "sr": cfg.to_dict()["sr"]}
    out = write_model_file(cfg.train.save_path, base)
    log.info("Super-resolution stage (%d steps) added to %s.", stage.steps, out)
    return out
