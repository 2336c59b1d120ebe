"""Process-level faults, one test each: kill -9 (at random points and inside a save) then --auto_resume,
SIGTERM (a checkpoint at the step boundary, exit 128 + n), and two-process DDP (trains, resumes, and every
rank ends with the same weights). Plus ``moas tune``, which runs its trials as training runs."""

from __future__ import annotations

import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from moas.checkpoint import load_checkpoint, verify_checkpoint
from moas.train.rotation import find_latest_checkpoint

from .conftest import (
    REFERENCE_STEPS,
    TINY_CONFIG,
    assert_identical,
    reference_checkpoint,
    reference_config,
    weights,
)

pytestmark = pytest.mark.slow


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOAS_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def temp_files(d: Path) -> list[Path]:
    return [p for p in d.glob(".*.tmp-*")] if d.is_dir() else []


def test_kill_9_at_random_points_and_during_a_save_then_resume_bit_identically(
    reference, reference_data, workdir
):
    """Three kill -9 (one inside a checkpoint write, two at seeded random moments) and a last run with
    --auto_resume: the weights equal the uninterrupted reference run's, side networks and scalers included."""
    config = workdir / "reference.toml"
    config.write_text(reference_config(workdir, reference_data).to_toml())
    args = [sys.executable, "-m", "moas", "train", "--config", str(config), "--auto_resume", "--quiet"]
    ckpt = workdir / "ckpt"
    rng = random.Random(1234)
    kills = 0
    for round_ in range(3):
        during_save = round_ == 1
        # Slow saves (timing only) keep the run alive long enough to be hit; one round holds every write
        # open 1.5 s with its temp file complete, and is killed in there.
        env = base_env(MOAS_INJECT="slow_save@5")
        if during_save:
            env["MOAS_INJECT_SAVE_DELAY"] = "1.5"
        proc = subprocess.Popen(args, cwd=workdir, env=env, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        try:
            if during_save:  # a save of a run that already has checkpoints
                while time.time() < deadline and not temp_files(ckpt) and proc.poll() is None:
                    time.sleep(0.02)
                assert temp_files(ckpt), "never caught a save in progress"
            else:  # a random moment after training started: anywhere in a step or a save
                while time.time() < deadline and not list(ckpt.glob("*.pt.json")) and proc.poll() is None:
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 1.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        kills += proc.returncode == -signal.SIGKILL
        latest = find_latest_checkpoint(ckpt)  # also removes temp files of dead writers
        assert latest is not None and verify_checkpoint(latest)
        assert load_checkpoint(latest)["global_step"] >= 1
        assert not temp_files(ckpt)
    assert kills >= 2
    done = subprocess.run(args, cwd=workdir, env=base_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Resumed from" in done.stderr
    final = find_latest_checkpoint(ckpt)
    assert load_checkpoint(final)["global_step"] == REFERENCE_STEPS
    extra = ("disc", "sr", "scalers")
    assert_identical(
        weights(reference_checkpoint(reference, REFERENCE_STEPS), *extra), weights(final, *extra)
    )


def test_sigterm_saves_at_a_step_boundary_and_exits_128_plus_n(demo_dir, workdir):
    """The real process: the handler saves a checkpoint at the next step boundary (a second signal during
    the save changes nothing), and the command exits 128 + 15 with one line and no traceback. SIGINT takes
    the same path (moas.train.faults; tests/test_training_system.py)."""
    args = [sys.executable, "-m", "moas", "train", "--config", str(TINY_CONFIG), "--quiet"]
    args += ["--data_dir", str(demo_dir / "train"), "--max_steps", "1000", "--epochs", "50"]
    env = base_env(MOAS_TRAIN_GRAD_ACCUM_STEPS="2", MOAS_RESOURCES_CPU_THREADS="1", MOAS_INJECT="slow_save@5")
    env["MOAS_TRAIN_SAMPLE_EVERY"] = "0"
    proc = subprocess.Popen(args, cwd=workdir, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    perf = workdir / "logs" / "performance.log"
    while time.time() < deadline and proc.poll() is None:
        if perf.is_file() and perf.read_text().count("step=") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # a second signal while it saves
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    saved = sorted((workdir / "checkpoints").glob("checkpoint_*.pt"))
    assert len(saved) == 1 and verify_checkpoint(saved[0])
    state = load_checkpoint(saved[0])
    assert state["kind"] == "signal" and state["global_step"] >= 2
    assert state["batch_in_epoch"] % 2 == 0  # a step boundary: accumulation 2 never splits a step
    assert f"Stopped by signal {int(signal.SIGTERM)}" in err and "Traceback" not in err


def _ddp_worker(rank: int, port: int, root: str, data: str, max_steps: int) -> None:
    """One rank of a two-process run through the real ``moas train`` (torchrun's environment variables);
    each rank writes its own final weights, since only rank 0 writes checkpoints."""
    from moas.cli import main
    from moas.train import loop

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.update(MOAS_TRAIN_GRAD_ACCUM_STEPS="1", MOAS_TRAIN_SAMPLE_EVERY="0")
    os.environ.update(OMP_NUM_THREADS="1", MOAS_RESOURCES_CPU_THREADS="1")
    real_finish = loop.Trainer._finish

    def finish(self):
        parts = self.parts
        state = {
            "model": parts.model.state_dict(),
            "ema": parts.ema.model.state_dict(),
            "enhancer": parts.side.enhancer.state_dict(),
            "step": torch.tensor(self.state.global_step),
        }
        torch.save(state, f"{root}/rank{rank}_{max_steps}.pt")
        return real_finish(self)

    loop.Trainer._finish = finish
    os.chdir(root)
    args = ["train", "--config", str(TINY_CONFIG), "--data_dir", data, "--quiet"]
    assert main([*args, "--max_steps", str(max_steps), "--auto_resume"]) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_trains_resumes_and_keeps_the_ranks_identical(demo_dir, workdir):
    """Two gloo ranks train on different shards; DDP (the generator) and the averaged side network (the
    enhancer) leave both copies bit-identical; a mid-epoch checkpoint resumes on two ranks; rank 0 alone
    writes."""
    data = str(demo_dir / "train")
    mp.spawn(_ddp_worker, args=(_free_port(), str(workdir), data, 2), nprocs=2, join=True)
    state = load_checkpoint(find_latest_checkpoint(workdir / "checkpoints"))
    assert state["world_size"] == 2 and state["global_step"] == 2 and len(state["train_rng"]) == 2
    # 24 images, micro-batch 4, 2 ranks: 3 steps per epoch; step 2 is mid-epoch (batch 2 of 3 per rank).
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 2)
    mp.spawn(_ddp_worker, args=(_free_port(), str(workdir), data, 4), nprocs=2, join=True)
    final = load_checkpoint(find_latest_checkpoint(workdir / "checkpoints"))
    assert final["global_step"] == 4 and final["epoch"] == 1  # past an epoch boundary
    assert "DDP: rank 0 of 2 (gloo)" in (workdir / "logs" / "main.log").read_text()
    assert "Resumed from" in (workdir / "logs" / "main.log").read_text()
    assert len(list((workdir / "runs").iterdir())) == 1
    assert (workdir / "logs" / "performance.log").read_text().count("step=") == 4
    r0, r1 = (torch.load(workdir / f"rank{r}_4.pt", weights_only=True) for r in (0, 1))
    assert int(r0["step"]) == int(r1["step"]) == 4
    # The EMA copy's routing statistics (not weights) also count rank 0's validation passes.
    stats = ("call_count", "success_rate", "load_sum", "load_calls")
    for part in ("model", "ema", "enhancer"):
        assert r0[part].keys() == r1[part].keys()
        keys = [k for k in r0[part] if part != "ema" or k.rsplit(".", 1)[-1] not in stats]
        diff = [k for k in keys if not torch.equal(r0[part][k], r1[part][k])]
        assert not diff, f"{part}: {len(diff)} tensors differ between the ranks, e.g. {diff[:3]}"


def test_tune_cli_writes_results_and_best_config(demo_dir, workdir, capsys, monkeypatch):
    import json

    from moas.cli import main
    from moas.config import load_config

    monkeypatch.setenv("MOAS_RESOURCES_CPU_THREADS", "1")
    args = ["tune", "--config", str(TINY_CONFIG), "--data_dir", str(demo_dir / "train"), "--trials", "2"]
    args += ["--steps", "2", "--budget_minutes", "10", "--best_config", "configs/tuned.toml"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("trial  score") and "configs/tuned.toml" in out
    rows = json.loads((workdir / "tune" / "tune_results.json").read_text())
    assert len(rows) == 2 and all(math.isfinite(r["score"]) and r["status"] == "ok" for r in rows)
    best = min(rows, key=lambda r: r["score"])["params"]
    cfg = load_config(None, workdir / "configs" / "tuned.toml", use_env=False)
    assert cfg.train.lr == pytest.approx(best["lr"]) and cfg.train.batch_size == best["batch_size"]
