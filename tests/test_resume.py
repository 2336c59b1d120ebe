"""Exact resume and fault recovery of the Trainer, in-process on CPU with the tiny config.

Golden test: N optimizer steps straight and k steps + checkpoint + --auto_resume + N−k steps give
bit-identical weights (mid-epoch and at an epoch boundary). Fault tests inject OOM / NaN / Inf through
``MOAS_INJECT`` (moas.train.faults) and check recovery and that no non-finite value is ever saved.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from moas import checkpoint as ckpt_mod
from moas.checkpoint import load_checkpoint, verify_checkpoint
from moas.config import load_config
from moas.errors import CheckpointError, MoasError
from moas.train.loop import Trainer, build_trainer, train
from moas.train.rng import nonfinite_tensor
from moas.train.rotation import find_latest_checkpoint
from moas.train.signals import TrainingInterrupted

from .conftest import TINY_CONFIG, module_tmp

pytestmark = pytest.mark.slow

# 24 demo images, micro-batch 4 → 6 batches per epoch; accumulation 2 → 3 optimizer steps per epoch.


def tiny(root: Path, data: Path, **train_kw) -> object:
    over = {
        "data": {"data_dir": str(data), "cache_dir": str(root / "cache")},
        "train": {
            "checkpoint_dir": str(root / "ckpt"),
            "run_dir": str(root / "runs"),
            "save_path": str(root / "model.pt"),
            "epochs": 3,
            "grad_accum_steps": 2,
            "sample_every": 0,
            "save_every": 100,
            **train_kw,
        },
        # One thread: two OpenMP threads on a busy 2-core machine spin-wait ~30x slower.
        "resources": {"cpu_threads": 1},
    }
    return load_config(None, TINY_CONFIG, over, use_env=False)


def deep_merge_cfg(cfg, over: dict):
    from moas.config import MoasConfig, deep_merge

    return MoasConfig.from_dict(deep_merge(cfg.to_dict(), over))


def weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    return {
        **{f"m.{k}": v for k, v in state["model"].items()},
        **{f"e.{k}": v for k, v in state["ema"]["model"].items()},
    }


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def record_steps(mp: pytest.MonkeyPatch) -> dict[int, list[int]]:
    """Patch the Trainer to record which images each optimizer step learns from (step → image indices).

    A micro-batch that starts a step resets that step's list, so a step redone after an out-of-memory
    recovery is recorded once, as it was finally trained."""
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


@pytest.fixture(scope="module")
def straight(tmp_path_factory, demo_dir):
    """The reference: 7 optimizer steps in one go (2 epochs + 1 step), and the images of each step."""
    with module_tmp(tmp_path_factory, "straight") as root, pytest.MonkeyPatch.context() as mp:
        steps = record_steps(mp)
        r = train(tiny(root, demo_dir / "train", max_steps=7), progress=False)
        assert r.global_step == 7
        return {"weights": weights(find_latest_checkpoint(root / "ckpt")), "steps": dict(steps)}


@pytest.mark.parametrize("k", [2, 3], ids=["mid_epoch", "epoch_boundary"])
def test_golden_resume_is_bit_identical(straight, tmp_path, demo_dir, k):
    data = demo_dir / "train"
    first = train(tiny(tmp_path, data, max_steps=k), progress=False)
    assert first.global_step == k
    latest = find_latest_checkpoint(tmp_path / "ckpt")
    state = load_checkpoint(latest)
    assert (state["epoch"], state["batch_in_epoch"]) == ((0, 4) if k == 2 else (1, 0))
    second = train(tiny(tmp_path, data, max_steps=7, auto_resume=True), progress=False)
    assert second.global_step == 7
    assert_identical(straight["weights"], weights(find_latest_checkpoint(tmp_path / "ckpt")))
    resumed = load_checkpoint(find_latest_checkpoint(tmp_path / "ckpt"))
    assert resumed["ema"]["num_updates"] == 7 and resumed["scheduler"]["step_count"] == 7


def test_injected_oom_recovers_with_the_same_effective_batch(straight, tmp_path, demo_dir, monkeypatch):
    steps = record_steps(monkeypatch)
    monkeypatch.setenv("MOAS_INJECT", "oom@3")  # the first micro-batch of step 2
    r = train(tiny(tmp_path, demo_dir / "train", max_steps=7), progress=False)
    assert (r.micro_batch, r.grad_accum) == (2, 4)  # 4 × 2 → 2 × 4: the effective batch stays 8
    assert r.global_step == 7
    emergency = tmp_path / "ckpt" / "emergency_oom_epoch_0001.pt"
    assert verify_checkpoint(emergency)
    e = load_checkpoint(emergency)
    assert (e["global_step"], e["batch_in_epoch"], e["micro_batch"]) == (1, 2, 4)
    final = load_checkpoint(find_latest_checkpoint(tmp_path / "ckpt"))
    assert (final["micro_batch"], final["grad_accum"]) == (2, 4)
    # Every step, before and after the recovery, learned from the same 8 images as the straight run.
    assert sorted(steps) == sorted(straight["steps"]) == list(range(1, 8))
    for k, images in straight["steps"].items():
        assert sorted(steps[k]) == sorted(images) and len(images) == 8, k


def test_after_an_oom_the_run_follows_the_straight_run(tmp_path, demo_dir, monkeypatch):
    """Same images, same noise and timesteps (drawn per optimizer step), smaller pieces: every step's loss
    equals the straight run's and the weights end where its weights do, up to float summation order.

    Text conditioning: the brain's dropout masks and its batch-level load-balance term depend on how a
    step is cut, so with the brain they differ by design. Biases that feed a GroupNorm have no gradient
    but float noise, which AdamW turns into steps of up to ``lr``; so the weights are compared at 1e-3
    (4 steps of lr 1e-3 after the recovery), the input convolution, which has a real gradient, at 1e-6."""
    from .test_golden import tensorboard_scalars

    text = {"brain": {"conditioning": "text"}, "enhance": {"train": False}}
    ref = train(deep_merge_cfg(tiny(tmp_path / "ref", demo_dir / "train", max_steps=5), text), progress=False)
    monkeypatch.setenv("MOAS_INJECT", "oom@3")
    oom = train(deep_merge_cfg(tiny(tmp_path / "oom", demo_dir / "train", max_steps=5), text), progress=False)
    assert (ref.micro_batch, oom.micro_batch, oom.global_step) == (4, 2, 5)
    la = [v for _, v in tensorboard_scalars(ref.run_dir, "loss/total")]
    lb = [v for _, v in tensorboard_scalars(oom.run_dir, "loss/total")]
    assert len(la) == len(lb) == 5
    for step, (x, y) in enumerate(zip(la, lb, strict=True), 1):
        assert y == pytest.approx(x, rel=1e-5), step
    a = weights(find_latest_checkpoint(tmp_path / "ref" / "ckpt"))
    b = weights(find_latest_checkpoint(tmp_path / "oom" / "ckpt"))
    key = "m.unet.unet.conv_in.weight"
    before = weights(tmp_path / "oom" / "ckpt" / "emergency_oom_epoch_0001.pt")[key]
    assert not torch.allclose(a[key], before, rtol=0, atol=1e-4)  # the recovered steps moved it
    torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-3, msg=k)


def test_oom_at_the_minimum_batch_stops_with_a_clear_message(tmp_path, demo_dir, monkeypatch):
    monkeypatch.setenv("MOAS_INJECT", "oom@1")
    cfg = tiny(tmp_path, demo_dir / "train", max_steps=3, min_batch_size=4)
    with pytest.raises(MoasError, match="Out of memory even at micro-batch 4"):
        train(cfg, progress=False)
    assert verify_checkpoint(tmp_path / "ckpt" / "emergency_oom_epoch_0001.pt")


@pytest.mark.parametrize("fault", ["nan_loss@3", "inf_grad@4"])
def test_non_finite_step_is_skipped_and_never_saved(tmp_path, demo_dir, monkeypatch, fault):
    monkeypatch.setenv("MOAS_INJECT", fault)
    r = train(tiny(tmp_path, demo_dir / "train", max_steps=4, save_every_steps=1), progress=False)
    assert r.skipped_steps == 1 and r.global_step == 4
    for p in sorted((tmp_path / "ckpt").glob("*.pt")):
        state = load_checkpoint(p)
        assert nonfinite_tensor(state) is None, p
    assert load_checkpoint(find_latest_checkpoint(tmp_path / "ckpt"))["skipped_steps"] == 1


def test_non_finite_weights_are_refused_at_save(tmp_path, demo_dir):
    t = build_trainer(tiny(tmp_path, demo_dir / "train"), progress=False)
    t.save("checkpoint_00000000.pt")
    with torch.no_grad():
        next(t.parts.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        t.save("checkpoint_00000001.pt")
    assert [p.name for p in (tmp_path / "ckpt").glob("*.pt")] == ["checkpoint_00000000.pt"]
    t.monitor.close()


def test_unrestorable_cuda_rng_state_is_an_error(tmp_path, demo_dir):
    train(tiny(tmp_path, demo_dir / "train", max_steps=1), progress=False)
    path = find_latest_checkpoint(tmp_path / "ckpt")
    state = load_checkpoint(path)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * (n + 1)
    del state["moas_format"]
    ckpt_mod.save_checkpoint(path, state, {"global_step": 1, "epoch": 0})
    with pytest.raises(CheckpointError, match="RNG states that cannot be restored"):
        build_trainer(tiny(tmp_path, demo_dir / "train", max_steps=2, auto_resume=True), progress=False)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, demo_dir, monkeypatch):
    t = build_trainer(tiny(tmp_path, demo_dir / "train", keep_last=1), progress=False)
    first = t.save("checkpoint_00000001.pt")
    before = first.read_bytes()
    real_open = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            n = self.f.write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device") if n is not None else None

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

    monkeypatch.setattr(ckpt_mod.os, "fdopen", lambda fd, mode: FullDisk(real_open(fd, mode)))
    t.state.global_step = 2
    with pytest.raises(CheckpointError, match="No space left"):
        t.save("checkpoint_00000002.pt")
    monkeypatch.undo()
    assert first.read_bytes() == before and verify_checkpoint(first)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "checkpoint_00000001.pt",
        "checkpoint_00000001.pt.json",
    ]
    assert find_latest_checkpoint(tmp_path / "ckpt") == first
    t.monitor.close()


@pytest.mark.parametrize("signum", [signal.SIGINT])  # SIGTERM: the CLI test in test_faults_process.py
def test_signal_saves_at_the_step_boundary_and_exits_128_plus_n(tmp_path, demo_dir, signum):
    t = build_trainer(tiny(tmp_path, demo_dir / "train", max_steps=50, epochs=20), progress=False)
    real_step = t._optimizer_step

    def step_then_signal(*a, **kw):
        real_step(*a, **kw)
        if t.state.global_step == 2:
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)  # a second signal must not disturb the save

    t._optimizer_step = step_then_signal
    with pytest.raises(TrainingInterrupted) as info:
        t.run()
    assert info.value.exit_code == 128 + signum
    path = tmp_path / "ckpt" / "checkpoint_00000002.pt"
    assert verify_checkpoint(path) and load_checkpoint(path)["global_step"] == 2
    assert signal.getsignal(signum) is not t.stopper._handle  # handlers restored
    assert threading.current_thread() is threading.main_thread()


def test_unrecoverable_error_writes_emergency_checkpoint_and_error_log(tmp_path, demo_dir, monkeypatch):
    from moas.monitor.logs import setup_logging

    setup_logging(tmp_path / "logs")
    monkeypatch.setenv("MOAS_INJECT", "crash@5")  # micro-batch 5: after two optimizer steps
    try:
        with pytest.raises(RuntimeError, match="injected crash"):
            train(tiny(tmp_path, demo_dir / "train", max_steps=7), progress=False)
    finally:
        setup_logging(None)
    path = tmp_path / "ckpt" / "emergency_epoch_0001.pt"
    state = load_checkpoint(path)
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (2, 0, 4)
    assert find_latest_checkpoint(tmp_path / "ckpt") == path
    err = (tmp_path / "logs" / "error.log").read_text()
    assert "Unrecoverable error at epoch 1, step 2" in err and "emergency checkpoint" in err
    assert "Traceback" in err  # the context for a bug report
    perf = (tmp_path / "logs" / "performance.log").read_text()
    assert perf.count("step=") == 2 and "rss_gb=" in perf


def test_tampered_checkpoint_is_refused_without_running_it(tmp_path, demo_dir):
    import hashlib
    import json

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    evil = ckpt / "epoch_9999.pt"
    torch.save({"model": Payload(), "moas_format": ckpt_mod.CHECKPOINT_FORMAT}, evil)
    data = evil.read_bytes()  # a forged sidecar, so the file passes the checksum check
    record = {
        "format": ckpt_mod.CHECKPOINT_FORMAT,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    (ckpt / "epoch_9999.pt.json").write_text(json.dumps({**record, "global_step": 10**6, "epoch": 9999}))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        build_trainer(tiny(tmp_path, demo_dir / "train", auto_resume=True), progress=False)
    assert not marker.exists()


def test_only_the_newest_checkpoints_keep_optimizer_state(tmp_path, demo_dir):
    r = train(
        tiny(tmp_path, demo_dir / "train", max_steps=5, save_every_steps=1, keep_optimizer_last=2),
        progress=False,
    )
    assert r.global_step == 5
    ckpt = tmp_path / "ckpt"
    names = sorted(p.name for p in ckpt.glob("*.pt"))
    full = [n for n in names if "optimizer" in load_checkpoint(ckpt / n)]
    assert full == ["checkpoint_00000004.pt", "checkpoint_00000005.pt"], names
    light = load_checkpoint(ckpt / "checkpoint_00000001.pt")
    assert light["resumable"] is False and "model" in light and "ema" in light
    assert all(verify_checkpoint(ckpt / n) for n in names)
    assert find_latest_checkpoint(ckpt).name == "checkpoint_00000005.pt"
    # With the full checkpoints gone, resuming refuses rather than silently starting over.
    for n in full:
        (ckpt / n).write_bytes(b"corrupt")
    assert find_latest_checkpoint(ckpt) is None
    assert find_latest_checkpoint(ckpt, resumable_only=False).name == "epoch_0001.pt"
    with pytest.raises(CheckpointError, match="holds weights only"):
        build_trainer(tiny(tmp_path, demo_dir / "train", auto_resume=True), progress=False)
