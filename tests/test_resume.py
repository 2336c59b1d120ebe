"""Exact resume and fault recovery of the Trainer, in-process on CPU.

Every resume variant compares against the session's one straight ``reference`` run (tests/conftest.py:
the brain, panel sequences, augmentation, the super-resolution stage, the discriminator, fp16 with its
GradScalers, gradient accumulation): stopped mid-epoch, resumed to an epoch boundary, resumed to the end,
each checkpoint bit-identical to the reference's at the same step. Fault tests inject OOM / NaN / Inf
through ``MOAS_INJECT`` (moas.train.faults) and check recovery and that no non-finite value is ever saved.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch

from moas import checkpoint as ckpt_mod
from moas.checkpoint import load_checkpoint, verify_checkpoint
from moas.errors import CheckpointError, MoasError
from moas.train.loop import build_trainer, train
from moas.train.rng import nonfinite_tensor
from moas.train.rotation import find_latest_checkpoint

from .conftest import (
    REFERENCE_STEPS,
    assert_identical,
    record_steps,
    reference_checkpoint,
    reference_config,
    tiny,
    weights,
)

pytestmark = pytest.mark.slow

RESUMED_STATE = ("disc", "enh", "sr", "scalers")  # beside the generator and its EMA


def test_the_reference_trains_every_part_that_has_state_to_resume(reference):
    """What the resume tests below compare is really trained: the brain, the panel memory (temporal loss),
    the augmentation input, the discriminator, the super-resolution stage, fp16 through GradScalers."""
    from moas.data.augment import AUG_DIM
    from moas.inference.model_file import read_model_file

    from .test_golden import tensorboard_scalars

    state = load_checkpoint(reference_checkpoint(reference, REFERENCE_STEPS))
    assert state["model_args"]["brain"]["conditioning"] == "moas"
    assert state["model_args"]["brain"]["panel_memory"] and state["model_args"]["augment_dim"] == AUG_DIM
    assert read_model_file(reference["result"].model_path).model_args["augment_dim"] == AUG_DIM
    emb = next(v for k, v in state["model"].items() if k.endswith("augment_embed.weight"))
    assert emb.abs().sum() > 0  # trained away from its zero start
    assert state["sr"]["steps"] == REFERENCE_STEPS and state["domain"]["disc"]
    assert state["scaler"]["scale"] > 0 and state["domain"]["disc_scaler"]["_growth_tracker"] > 0
    temporal = tensorboard_scalars(reference["result"].run_dir, "loss/temporal")
    assert temporal and all(v >= 0 for _, v in temporal)
    spe = reference["steps_per_epoch"]
    assert 2 < spe < REFERENCE_STEPS  # step 2 is mid-epoch, and the run crosses an epoch boundary


def test_resume_mid_epoch_and_at_an_epoch_boundary_is_bit_identical(reference, reference_data, tmp_path):
    """Stop at step 2 (mid-epoch: micro-batch 4 × accumulation 2 ends at batch 4), resume to the end of
    epoch 1, resume to the reference's last step; every checkpoint equals the reference's of that name."""
    spe = reference["steps_per_epoch"]
    stops = ((2, "checkpoint_00000002.pt", (0, 4)), (spe, "epoch_0001.pt", (1, 0)))
    stops += ((REFERENCE_STEPS, f"checkpoint_{REFERENCE_STEPS:08d}.pt", None),)
    for stop, name, position in stops:
        cfg = reference_config(tmp_path, reference_data, max_steps=stop, auto_resume=stop > 2)
        assert train(cfg, progress=False).global_step == stop
        ours, theirs = tmp_path / "ckpt" / name, reference["root"] / "ckpt" / name
        assert find_latest_checkpoint(tmp_path / "ckpt").name in (name, f"checkpoint_{stop:08d}.pt")
        state = load_checkpoint(ours)
        if position is not None:
            assert (state["epoch"], state["batch_in_epoch"]) == position
        assert_identical(weights(theirs, *RESUMED_STATE), weights(ours, *RESUMED_STATE))
    assert state["ema"]["num_updates"] == REFERENCE_STEPS
    assert state["scheduler"]["step_count"] == REFERENCE_STEPS


def test_injected_oom_recovers_with_the_same_effective_batch(
    reference, reference_data, tmp_path, monkeypatch
):
    steps = record_steps(monkeypatch)
    monkeypatch.setenv("MOAS_INJECT", "oom@3")  # the first micro-batch of step 2
    r = train(reference_config(tmp_path, reference_data), progress=False)
    assert (r.micro_batch, r.grad_accum) == (2, 4)  # 4 × 2 → 2 × 4: the effective batch stays 8
    assert r.global_step == REFERENCE_STEPS
    emergency = tmp_path / "ckpt" / "emergency_oom_epoch_0001.pt"
    assert verify_checkpoint(emergency)
    e = load_checkpoint(emergency)
    assert (e["global_step"], e["batch_in_epoch"], e["micro_batch"]) == (1, 2, 4)
    final = load_checkpoint(find_latest_checkpoint(tmp_path / "ckpt"))
    assert (final["micro_batch"], final["grad_accum"]) == (2, 4)
    # Every step, before and after the recovery, learned from the same 8 images as the straight run.
    straight = reference["steps"]
    assert sorted(steps) == sorted(straight) == list(range(1, REFERENCE_STEPS + 1))
    for k, images in straight.items():
        assert sorted(steps[k]) == sorted(images) and len(images) == 8, k


def test_after_an_oom_the_run_follows_the_straight_run(tmp_path, demo_dir, monkeypatch):
    """Same images, same noise and timesteps (drawn per optimizer step), smaller pieces: every step's loss
    equals the straight run's and the weights end where its weights do, up to float summation order.

    Text conditioning: the brain's dropout masks and its batch-level load-balance term depend on how a
    step is cut, so with the brain they differ by design. Biases that feed a GroupNorm have no gradient
    but float noise, which AdamW turns into steps of up to ``lr``; so the weights are compared at 1e-3
    (4 steps of lr 1e-3 after the recovery), the input convolution, which has a real gradient, at 1e-6."""
    from .test_golden import tensorboard_scalars

    text = {"enhance": {"train": False}}  # tiny.toml's conditioning is text-only
    ref = train(tiny(tmp_path / "ref", demo_dir / "train", text, max_steps=5), progress=False)
    monkeypatch.setenv("MOAS_INJECT", "oom@3")
    oom = train(tiny(tmp_path / "oom", demo_dir / "train", text, max_steps=5), progress=False)
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


def test_a_generator_that_never_gets_a_finite_loss_stops_with_a_checkpoint(tmp_path, demo_dir, monkeypatch):
    """20 skipped steps in a row: the run saves its last boundary and ends with one sentence instead of
    spending its epochs on nothing."""
    from moas.train.faults import FaultInjector

    monkeypatch.setattr(FaultInjector, "fires", lambda self, kind: kind == "nan_loss")
    cfg = tiny(tmp_path, demo_dir / "train", epochs=4, grad_accum_steps=1)  # 24 steps
    with pytest.raises(MoasError, match="generator's loss or gradient was not finite for 20 steps in a row"):
        train(cfg, progress=False)
    saved = load_checkpoint(tmp_path / "ckpt" / "checkpoint_00000000.pt")
    assert saved["global_step"] == 0 and saved["skipped_steps"] == 20


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
