"""Process-level faults: kill -9 at random points (and inside a save) then --auto_resume, and 2-process DDP."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moas.checkpoint import load_checkpoint, verify_checkpoint
from moas.config import load_config
from moas.train.loop import train
from moas.train.rotation import find_latest_checkpoint

from .conftest import TINY_CONFIG

pytestmark = pytest.mark.slow

ENV = {
    "MOAS_TRAIN_GRAD_ACCUM_STEPS": "2",
    "MOAS_TRAIN_EPOCHS": "4",
    "MOAS_TRAIN_SAMPLE_EVERY": "0",
    "MOAS_TRAIN_SAVE_EVERY": "100",
    "MOAS_RESOURCES_CPU_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
MAX_STEPS = 9


def cli_args(data: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "moas",
        "train",
        "--config",
        str(TINY_CONFIG),
        "--data_dir",
        str(data),
        "--max_steps",
        str(MAX_STEPS),
        "--save_every_steps",
        "1",
        "--auto_resume",
        "--quiet",
        *extra,
    ]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOAS_")}
    return {**env, **ENV}


def temp_files(d: Path) -> list[Path]:
    return [p for p in d.glob(".*.tmp-*")] if d.is_dir() else []


def test_kill_9_at_random_points_and_during_a_save_then_resume_bit_identically(demo_dir, workdir):
    data = demo_dir / "train"
    ckpt = workdir / "checkpoints"
    rng = random.Random(1234)
    kills = 0
    for round_ in range(3):
        env = base_env()
        during_save = round_ == 1
        if during_save:  # hold every write open 1.5 s with its temp file complete, and kill in there
            env["MOAS_INJECT_SAVE_DELAY"] = "1.5"
        proc = subprocess.Popen(cli_args(data), cwd=workdir, env=env, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        try:
            if during_save:
                # A save of a run that already has checkpoints (the resumed one writes its next step).
                while time.time() < deadline and not temp_files(ckpt) and proc.poll() is None:
                    time.sleep(0.02)
                assert temp_files(ckpt), "never caught a save in progress"
            else:
                # A random moment after training started (first checkpoint) — anywhere in a step or a save.
                while time.time() < deadline and not list(ckpt.glob("*.pt.json")) and proc.poll() is None:
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 1.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        latest = find_latest_checkpoint(ckpt)  # also removes temp files of dead writers
        assert latest is not None and verify_checkpoint(latest)
        assert load_checkpoint(latest)["global_step"] >= 1
        assert not temp_files(ckpt)
    assert kills >= 2
    done = subprocess.run(
        cli_args(data), cwd=workdir, env=base_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Resumed from" in done.stderr
    final = load_checkpoint(find_latest_checkpoint(ckpt))
    assert final["global_step"] == MAX_STEPS

    # The same run without interruptions, in-process: the killed-and-resumed weights are identical.
    ref = workdir / "ref"
    over = {
        "data": {"data_dir": str(data), "cache_dir": str(ref / "cache")},
        "train": {
            "checkpoint_dir": str(ref / "ckpt"),
            "run_dir": str(ref / "runs"),
            "save_path": str(ref / "m.pt"),
            "grad_accum_steps": 2,
            "epochs": 4,
            "sample_every": 0,
            "save_every": 100,
            "max_steps": MAX_STEPS,
        },
        "resources": {"cpu_threads": 1},
    }
    train(load_config(None, TINY_CONFIG, over, use_env=False), progress=False)
    straight = load_checkpoint(find_latest_checkpoint(ref / "ckpt"))
    for k, v in straight["model"].items():
        assert torch.equal(v, final["model"][k]), k


def test_two_process_ddp_on_cpu_trains_and_resumes(demo_dir, workdir):
    def launch(max_steps: int) -> subprocess.CompletedProcess:
        args = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "moas",
            "train",
            "--config",
            str(TINY_CONFIG),
            "--data_dir",
            str(demo_dir / "train"),
            "--max_steps",
            str(max_steps),
            "--auto_resume",
            "--quiet",
        ]
        env = {**base_env(), "MOAS_TRAIN_GRAD_ACCUM_STEPS": "1", "OMP_NUM_THREADS": "1"}
        return subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)

    first = launch(2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "DDP: rank 0 of 2 (gloo)" in first.stderr
    state = load_checkpoint(find_latest_checkpoint(workdir / "checkpoints"))
    assert state["world_size"] == 2 and state["global_step"] == 2 and len(state["train_rng"]) == 2
    # 24 images, micro-batch 4, 2 ranks: 3 steps per epoch; step 2 is mid-epoch (batch 2 of 3 per rank).
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 2)
    second = launch(4)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resumed from" in second.stderr
    final = load_checkpoint(find_latest_checkpoint(workdir / "checkpoints"))
    assert final["global_step"] == 4 and final["epoch"] == 1
    # Rank 0 alone writes: one run folder, one set of logs.
    assert len(list((workdir / "runs").iterdir())) == 1
    assert (workdir / "logs" / "performance.log").read_text().count("step=") == 4


def test_tune_cli_writes_results_and_best_config(demo_dir, workdir, capsys):
    from moas.cli import main

    os.environ["MOAS_RESOURCES_CPU_THREADS"] = "1"
    try:
        rc = main(
            [
                "tune",
                "--config",
                str(TINY_CONFIG),
                "--data_dir",
                str(demo_dir / "train"),
                "--trials",
                "2",
                "--steps",
                "2",
                "--budget_minutes",
                "10",
                "--best_config",
                "configs/tuned.toml",
            ]
        )
    finally:
        del os.environ["MOAS_RESOURCES_CPU_THREADS"]
    assert rc == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("trial  score") and "configs/tuned.toml" in out
    import json

    rows = json.loads((workdir / "tune" / "tune_results.json").read_text())
    assert len(rows) == 2 and all(math.isfinite(r["score"]) and r["status"] == "ok" for r in rows)
    from moas.config import load_config

    best = min(rows, key=lambda r: r["score"])["params"]
    cfg = load_config(None, workdir / "configs" / "tuned.toml", use_env=False)
    assert cfg.train.lr == pytest.approx(best["lr"]) and cfg.train.batch_size == best["batch_size"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_saves_at_a_step_boundary_and_exits_128_plus_n(demo_dir, workdir, signum):
    env = {**base_env(), "MOAS_TRAIN_EPOCHS": "50"}
    args = [*cli_args(demo_dir / "train"), "--max_steps", "1000", "--save_every_steps", "0"]
    proc = subprocess.Popen(args, cwd=workdir, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    perf = workdir / "logs" / "performance.log"
    while time.time() < deadline and proc.poll() is None:
        if perf.is_file() and perf.read_text().count("step=") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signum)
    time.sleep(0.05)
    proc.send_signal(signum)  # a second signal while it saves
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    saved = sorted((workdir / "checkpoints").glob("checkpoint_*.pt"))
    assert len(saved) == 1 and verify_checkpoint(saved[0])
    state = load_checkpoint(saved[0])
    assert state["kind"] == "signal" and state["global_step"] >= 2
    assert state["batch_in_epoch"] % 2 == 0  # a step boundary: accumulation 2 never splits a step
    assert f"Stopped by signal {int(signum)}" in err and "Traceback" not in err
