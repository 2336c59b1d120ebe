"""Shared fixtures: offline Hugging Face, a fixed seed, one text encoder per session, tiny demo data, the
session's one trained model and the one straight reference run that every resume variant compares against.

Two trainings serve the whole suite (tests/README in the module docstrings of their users):

* ``session_run``: ``moas make-data`` + ``moas train`` of ``tiny.toml`` through the real CLI, with the
  folder evaluation, sample prompts and a redirected console (read-only: copy before changing it);
* ``reference``: a straight in-process run of ``tiny.toml`` with everything that has state to resume
  switched on (the brain, panel sequences, augmentation, the super-resolution stage, the discriminator,
  fp16 with GradScalers, gradient accumulation), a checkpoint at every step, and the images each step
  learned from.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
torch.set_num_threads(2)

TESTS = Path(__file__).parent
TINY_CONFIG = TESTS / "tiny.toml"
GOLDEN_CONFIG = TESTS / "golden.toml"  # frozen: tests/test_golden.py's pinned numbers depend on it
BRAIN = {"brain": {"conditioning": "moas"}}  # the whole conditioning brain at tiny.toml's widths


@contextmanager
def module_tmp(factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A temporary folder for a module-scoped fixture, deleted when the module's tests are done."""
    root = factory.mktemp(name)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def text_encoder():
    from moas.text.encoder import TextEncoder

    return TextEncoder()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small demo data set (shared, read-only for tests)."""
    from moas.data.synthetic import generate_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(out, n_images=24, size=32, seed=3, progress=False)
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run inside an empty folder so runs/, checkpoints/, cache/ land in tmp."""
    monkeypatch.chdir(tmp_path)
    for k in list(os.environ):
        if k.startswith("MOAS_"):
            monkeypatch.delenv(k)
    return tmp_path


# ------------------------------------------------------------------------------------------- configs


def merged(cfg, over: dict):
    """``cfg`` (a MoasConfig) with the nested ``over`` dict merged in."""
    from moas.config import MoasConfig, deep_merge

    return MoasConfig.from_dict(deep_merge(cfg.to_dict(), over))


def tiny(root: Path, data: Path, overrides: dict | None = None, *, config: Path = TINY_CONFIG, **train_kw):
    """``tiny.toml`` with every output under ``root``: 3 epochs, gradient accumulation 2, no sample grids,
    one thread (two OpenMP threads on a busy 2-core machine spin-wait ~30x slower). On ``demo_dir``'s 24
    images at micro-batch 4: 6 batches and 3 optimizer steps per epoch."""
    from moas.config import load_config

    over = {
        "data": {"data_dir": str(data), "cache_dir": str(root / "cache")},
        "train": {
            "checkpoint_dir": str(root / "ckpt"),
            "run_dir": str(root / "runs"),
            "save_path": str(root / "model.safetensors"),
            "log_dir": str(root / "logs"),
            "epochs": 3,
            "grad_accum_steps": 2,
            "sample_every": 0,
            "save_every": 100,
            **train_kw,
        },
        "resources": {"cpu_threads": 1},
    }
    cfg = load_config(None, config, over, use_env=False)
    return merged(cfg, overrides) if overrides else cfg


def weights(path: Path, *extra: str) -> dict[str, torch.Tensor]:
    """The generator and EMA tensors of a checkpoint, plus the states named in ``extra``: ``disc`` (the
    discriminator), ``enh`` (the enhancer: weights and RNG), ``sr`` (the super-resolution stage: weights,
    EMA and RNG), ``scalers`` (every GradScaler's state, as tensors)."""
    from moas.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    out = {f"m.{k}": v for k, v in state["model"].items()}
    out |= {f"e.{k}": v for k, v in state["ema"]["model"].items()}
    if "disc" in extra:
        out |= {f"disc.{k}": v for k, v in state["domain"]["disc"].items()}
    if "enh" in extra:
        out |= {f"enh.{k}": v for k, v in state["domain"]["enhancer"].items()}
        out["enh_rng"] = state["domain"]["hr_rng"]
    if "sr" in extra:
        sr = state["sr"]
        out |= {f"sr.{k}": v for k, v in sr["model"].items()}
        out |= {f"sr_ema.{k}": v for k, v in sr["ema"]["model"].items()}
        out["sr_rng"] = sr["rng"]
    if "scalers" in extra:
        scalers = {"gen": state["scaler"], "disc": state["domain"]["disc_scaler"]}
        scalers["enh"] = state["domain"]["enh_scaler"]
        for name, s in scalers.items():
            out |= {f"scaler.{name}.{k}": torch.tensor(float(v)) for k, v in s.items()}
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def record_steps(mp: pytest.MonkeyPatch) -> dict[int, list[int]]:
    """Patch the Trainer to record which images each optimizer step learns from (step → image indices).

    A micro-batch that starts a step resets that step's list, so a step redone after an out-of-memory
    recovery is recorded once, as it was finally trained."""
    from moas.train.loop import Trainer

    steps: dict[int, list[int]] = {}
    real = Trainer._micro_step

    def micro_step(self, batch, *a, **kw):
        st = self.state
        if st.micro_in_step == 0:
            steps[st.global_step + 1] = []
        steps[st.global_step + 1] += [int(i) for i in batch["index"]]
        return real(self, batch, *a, **kw)

    mp.setattr(Trainer, "_micro_step", micro_step)
    return steps


# -------------------------------------------------------------------------------- the session's model

SESSION_EXTRA = """
[train]
epochs = 3
sample_every = 1
keep_last = 10

[monitor]
folder_eval = true
folder_eval_n = 4
eval_n = 4
measure_every = 2
dashboard_every_s = 0
"""


@pytest.fixture(scope="session")
def session_run(tmp_path_factory) -> Path:
    """The suite's one trained model: ``moas make-data`` (24 images, one held out for validation) and a
    3-epoch ``moas train`` of ``tiny.toml`` with the folder evaluation and a sample-prompts file, its
    console output (not a terminal) in ``train.log``. Read-only: copy before changing anything.

    The folder holds ``data/demo/`` (its ``train/`` with the tag model's cache), ``checkpoints/``,
    ``models/best_model.safetensors`` (+ card), ``models/last_model.safetensors``, ``runs/<run>/``,
    ``logs/`` and ``train.log``."""
    import tomllib

    from moas.cli import main
    from moas.config import deep_merge, dict_to_toml
    from moas.monitor.logs import setup_logging

    root = tmp_path_factory.mktemp("session_run")
    merged_toml = deep_merge(tomllib.loads(TINY_CONFIG.read_text()), tomllib.loads(SESSION_EXTRA))
    (root / "session.toml").write_text(dict_to_toml(merged_toml))
    (root / "prompts.txt").write_text(
        "# sample grid prompts\n1girl, red hair, blue eyes, forest --seed 11\n"
        "1girl, blonde hair, beach --steps 2 --scale 1.5\n"
    )
    cwd = os.getcwd()
    os.chdir(root)
    try:
        data = ["make-data", "--out", "data/demo", "--n_images", "24", "--size", "32", "--seed", "3"]
        args = ["train", "--config", "session.toml", "--data_dir", "data/demo/train"]
        with (
            open(root / "train.log", "w") as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            assert main(data) == 0
            assert main([*args, "--sample_prompts", "prompts.txt"]) == 0
    finally:
        setup_logging(None)  # the console handler back on pytest's stderr, not the closed log file
        os.chdir(cwd)
    return root


# ------------------------------------------------------------------------------------- the reference

REFERENCE = {
    **BRAIN,
    "data": {"augment": 1.0},
    "train": {"mixed_precision": "fp16", "save_every_steps": 1, "save_every": 1},
    "losses": {"adversarial": True, "disc_warmup_steps": 1},
    "sr": {"train": True},
}
REFERENCE_STEPS = 7


@pytest.fixture(scope="session")
def reference_data(tmp_path_factory) -> Path:
    """Demo images and panel sequences for the reference run (read-only)."""
    from moas.data.synthetic import generate_demo_dataset

    out = tmp_path_factory.mktemp("reference_data")
    generate_demo_dataset(out, n_images=20, size=32, seed=3, progress=False, sequences=2)
    return out / "train"


def reference_config(root: Path, data: Path, **train_kw):
    return tiny(root, data, REFERENCE, **{"max_steps": REFERENCE_STEPS, **train_kw})


@pytest.fixture(scope="session")
def reference(tmp_path_factory, reference_data) -> dict:
    """The straight run every resume variant compares against: ``REFERENCE_STEPS`` optimizer steps in one
    go, a checkpoint after each (``ckpt/checkpoint_<step>.pt``) and at each epoch's end, the images of every
    step, and the run's steps per epoch. Read-only."""
    from moas.train.loop import train

    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        steps = record_steps(mp)
        r = train(reference_config(root, reference_data), progress=False)
    assert r.global_step == REFERENCE_STEPS and r.skipped_steps == 0
    from moas.checkpoint import checkpoint_record

    first_epoch = checkpoint_record(root / "ckpt" / "epoch_0001.pt")["global_step"]
    return {"root": root, "steps": dict(steps), "steps_per_epoch": first_epoch, "result": r}


def reference_checkpoint(reference: dict, step: int) -> Path:
    return reference["root"] / "ckpt" / f"checkpoint_{step:08d}.pt"
