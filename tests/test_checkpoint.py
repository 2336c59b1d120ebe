"""Tests for moas.io / moas.checkpoint / moas.train.rotation: atomic saves, verification, safe loading, discovery, rotation, RNG."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moas import io as moas_io
from moas.checkpoint import (
    checkpoint_record,
    epoch_checkpoint_name,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from moas.errors import CheckpointError
from moas.io import atomic_write_bytes, file_sha256, short_hash, sidecar_path
from moas.train.rng import capture_rng_state, restore_rng_state
from moas.train.rotation import (
    contents_of,
    find_latest_checkpoint,
    reduce_old_checkpoints,
    rotate_checkpoints,
    rotate_emergency_checkpoints,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _save_epoch(directory: Path, epoch: int, step: int | None = None, **extra) -> Path:
    state = {"weights": torch.full((4,), float(epoch)), "epoch": epoch, **extra}
    meta = {"epoch": epoch, "global_step": step if step is not None else epoch * 10, "kind": "epoch"}
    return save_checkpoint(directory / epoch_checkpoint_name(epoch), state, meta)


def _tmp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".tmp-" in p.name]


def test_round_trip_model_optimizer_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": capture_rng_state(),
        "epoch": 7,
    }
    path = save_checkpoint(
        tmp_path / "run" / "epoch_0007.pt", state, {"epoch": 7, "global_step": 70, "kind": "epoch"}
    )
    assert "moas_format" not in state  # caller's dict untouched

    record = json.loads(sidecar_path(path).read_text())
    assert record["format"] == "moas-checkpoint-v1"
    assert record["size"] == path.stat().st_size
    assert record["sha256"] == file_sha256(path)
    assert (record["epoch"], record["global_step"], record["kind"]) == (7, 70, "epoch")
    assert short_hash(path) == record["sha256"][:10]
    assert verify_checkpoint(path)

    # The file itself is loadable by plain torch in weights-only mode.
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["moas_format"] == "moas-checkpoint-v1"

    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 7
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model2.load_state_dict(loaded["model"])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    restore_rng_state(loaded["rng"])


def test_atomic_write_bytes_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert _tmp_files(tmp_path) == []


def test_missing_directory_and_empty(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="No model file at"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")


def test_truncated_file(tmp_path: Path) -> None:
    path = _save_epoch(tmp_path, 1)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(cut, verify=False)
    # Truncating in place: the sidecar no longer matches.
    path.write_bytes(data[:-20])
    assert not verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def test_non_moas_and_text_files(tmp_path: Path) -> None:
    plain = tmp_path / "other.pt"
    torch.save({"weight": torch.ones(2)}, plain)
    with pytest.raises(CheckpointError, match="not a moas checkpoint"):
        load_checkpoint(plain)
    text = tmp_path / "notes.pt"
    text.write_text("this is not a model\n" * 10)
    with pytest.raises(CheckpointError, match="not a PyTorch model file"):
        load_checkpoint(text)


class _Payload:
    """Unpickling this would create a marker file; the weights-only loader must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_arbitrary_pickle_is_refused_without_executing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"moas_format": "moas-checkpoint-v1", "x": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_missing_sidecar_loads_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _save_epoch(tmp_path, 3)
    sidecar_path(path).unlink()
    assert not verify_checkpoint(path)
    with caplog.at_level(logging.WARNING, logger="moas.checkpoint"):
        assert load_checkpoint(path)["epoch"] == 3
    assert any("integrity" in r.getMessage() for r in caplog.records)


def test_unreadable_sidecar_is_an_error(tmp_path: Path) -> None:
    path = _save_epoch(tmp_path, 3)
    sidecar_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        load_checkpoint(path)
    assert load_checkpoint(path, verify=False)["epoch"] == 3


def test_sidecar_mismatch_is_skipped_by_find_latest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    older = _save_epoch(tmp_path, 1)
    newer = _save_epoch(tmp_path, 2)
    data = bytearray(newer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    newer.write_bytes(bytes(data))
    assert verify_checkpoint(older) and not verify_checkpoint(newer)
    with caplog.at_level(logging.WARNING, logger="moas.train.rotation"):
        assert find_latest_checkpoint(tmp_path) == older
    assert any(newer.name in r.getMessage() for r in caplog.records)


def test_find_latest_orders_by_global_step_then_epoch(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path / "nope") is None
    assert find_latest_checkpoint(tmp_path) is None
    _save_epoch(tmp_path, 5, step=100)
    best = save_checkpoint(tmp_path / "best_model.pt", {"x": 1}, {"epoch": 6, "global_step": 120})
    emergency = save_checkpoint(
        tmp_path / "emergency_oom_epoch_0006.pt", {"x": 2}, {"epoch": 7, "global_step": 120}
    )
    save_checkpoint(tmp_path / "unrelated_name.pt", {"x": 3}, {"epoch": 99, "global_step": 999})
    assert find_latest_checkpoint(tmp_path) == emergency
    sidecar_path(emergency).unlink()
    assert find_latest_checkpoint(tmp_path) == best


def test_stray_temp_files_are_ignored_and_cleaned(tmp_path: Path) -> None:
    good = _save_epoch(tmp_path, 1)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stray = tmp_path / f".epoch_0002.pt.tmp-{dead_pid}-deadbeef"
    stray.write_bytes(b"half a checkpoint")
    live = tmp_path / f".epoch_0003.pt.tmp-{os.getpid()}-cafef00d"  # a save in progress right now
    live.write_bytes(b"in flight")
    assert find_latest_checkpoint(tmp_path) == good
    assert not stray.exists()
    assert live.exists()


def test_crash_between_data_and_sidecar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    older = _save_epoch(tmp_path, 1)
    real_write = moas_io.atomic_write_bytes

    def failing_sidecar_write(path, data):
        if str(path).endswith(".json"):
            raise OSError(errno.EIO, "simulated crash")
        real_write(path, data)

    monkeypatch.setattr(moas_io, "atomic_write_bytes", failing_sidecar_write)
    with pytest.raises(CheckpointError, match="Could not write checkpoint"):
        _save_epoch(tmp_path, 2)
    monkeypatch.undo()
    newer = tmp_path / "epoch_0002.pt"
    assert newer.exists() and not sidecar_path(newer).exists()
    assert find_latest_checkpoint(tmp_path) == older


def test_failed_rename_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "best_model.pt", {"v": torch.tensor([1.0])}, {"global_step": 1})
    real_replace = os.replace

    def no_space(src, dst):
        if str(dst).endswith(".pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(path, {"v": torch.tensor([2.0])}, {"global_step": 2})
    monkeypatch.undo()
    assert verify_checkpoint(path)
    assert torch.equal(load_checkpoint(path)["v"], torch.tensor([1.0]))
    assert find_latest_checkpoint(tmp_path) == path
    assert _tmp_files(tmp_path) == []


_KILL_CHILD = textwrap.dedent(
    """
    import sys, torch
    from moas.checkpoint import save_checkpoint
    path = sys.argv[1]
    save_checkpoint(path, {"marker": 0, "data": torch.zeros(4_000_000)}, {"global_step": 0})
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        save_checkpoint(path, {"marker": i, "data": torch.full((4_000_000,), float(i))}, {"global_step": i})
    """
)


def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_latest.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(path)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 20
        while not _tmp_files(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.001)
        saw_temp = bool(_tmp_files(tmp_path))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert saw_temp, "the child never started writing a checkpoint"
    state = load_checkpoint(path)  # never raises: old or new file, always complete
    assert torch.equal(state["data"], torch.full((4_000_000,), float(state["marker"])))
    found = find_latest_checkpoint(tmp_path)  # also removes the dead writer's temp file
    assert found in (None, path)
    assert _tmp_files(tmp_path) == []


def test_rotation_keeps_newest_and_protected(tmp_path: Path) -> None:
    paths = [_save_epoch(tmp_path, e) for e in range(1, 7)]
    unrecorded = tmp_path / "epoch_0000.pt"
    unrecorded.write_bytes(b"someone else's file")
    deleted = rotate_checkpoints(tmp_path, keep=4, protect={"epoch_0002.pt"})
    assert deleted == [paths[0]]
    deleted = rotate_checkpoints(tmp_path, keep=2, protect={"epoch_0002.pt"})
    assert sorted(deleted) == [paths[2], paths[3]]
    remaining = sorted(p.name for p in tmp_path.glob("epoch_*.pt"))
    assert remaining == ["epoch_0000.pt", "epoch_0002.pt", "epoch_0005.pt", "epoch_0006.pt"]
    assert not any(sidecar_path(p).exists() for p in (paths[0], paths[2], paths[3]))
    assert rotate_checkpoints(tmp_path, keep=30) == []
    with pytest.raises(ValueError):
        rotate_checkpoints(tmp_path, keep=-1)


def test_epoch_checkpoint_name() -> None:
    assert epoch_checkpoint_name(40) == "epoch_0040.pt"
    assert epoch_checkpoint_name(12345) == "epoch_12345.pt"
    with pytest.raises(ValueError):
        epoch_checkpoint_name(-1)


class _Custom:
    pass


@pytest.mark.parametrize(
    "bad,where",
    [
        ({"a": {"b": [1, lambda: 0]}}, "state['a']['b'][1]"),
        ({"obj": _Custom()}, "state['obj']"),
        ({"arr": np.zeros(3)}, "state['arr']"),
        ({(1, 2): 3}, "state"),
    ],
)
def test_non_plain_state_raises_type_error(tmp_path: Path, bad: dict, where: str) -> None:
    with pytest.raises(TypeError) as info:
        save_checkpoint(tmp_path / "x.pt", bad)
    assert where in str(info.value)
    assert not (tmp_path / "x.pt").exists()


def test_meta_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "x.pt", {"a": 1}, {"when": object()})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", {"a": 1}, {"sha256": "x"})


def _draw() -> tuple:
    return (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        float(np.random.normal()),
        torch.rand(3).tolist(),
    )


def test_rng_round_trip_through_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.normal()  # ... and one in NumPy's (odd count of normals)
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = _draw()
    _draw()  # advance everything further
    restore_rng_state(load_checkpoint(path)["rng"])
    assert _draw() == expected


def test_malformed_rng_state_raises_and_changes_nothing() -> None:
    good = capture_rng_state()
    with pytest.raises(ValueError):
        restore_rng_state({})
    with pytest.raises(ValueError):
        restore_rng_state({**good, "python": {**good["python"], "state": good["python"]["state"][:10]}})
    with pytest.raises(ValueError):
        restore_rng_state({**good, "numpy": {**good["numpy"], "kind": "PCG64"}})
    with pytest.raises(ValueError):
        restore_rng_state({**good, "numpy": {**good["numpy"], "keys": good["numpy"]["keys"] - 2**40}})
    before = random.getstate()
    with pytest.raises(ValueError):
        restore_rng_state({**good, "torch_cpu": torch.zeros(7, dtype=torch.uint8)})
    assert random.getstate() == before  # validation happens before anything is applied
    with pytest.raises(ValueError):
        restore_rng_state({**good, "cuda": ["not a tensor"]})


# --------------------------------------------------------------------------- reducing old checkpoints


def _save_training_like(directory: Path, name: str, step: int) -> Path:
    """A checkpoint shaped like the training loop's (weights, EMA, optimizer, enhancer), 10 steps an epoch."""
    weights = {"w": torch.full((64,), float(step)), "buf": torch.arange(4, dtype=torch.float64)}
    state = {
        "kind": "epoch",
        "epoch": step // 10,
        "global_step": step,
        "model": {k: v.clone() for k, v in weights.items()},
        "ema": {"model": weights, "num_updates": step, "decay": 0.99},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(64)}}, "param_groups": []},
        "domain": {"enhancer": {"e": torch.ones(8)}, "enh_opt": {"state": {}}, "enh_steps": 1},
        "rng": {"torch_cpu": torch.zeros(8, dtype=torch.uint8)},
        "model_args": {"resolution": 16},
        "config": {"enhance": {"width": 8}},
        "text_encoder": "st:test",
    }
    return save_checkpoint(
        directory / name, state, {"epoch": step // 10, "global_step": step, "kind": "epoch"}
    )


def test_saving_streams_into_the_file_and_loading_maps_it(tmp_path, monkeypatch):
    """Host RAM by construction: torch.save writes straight into the temp file (hashed on the way, never a
    whole copy in memory), and load_checkpoint memory-maps the verified file instead of reading it in."""
    targets, loads = [], []
    real_save, real_load = torch.save, torch.load

    def save_spy(obj, f, *args, **kwargs):
        targets.append(f)
        return real_save(obj, f, *args, **kwargs)

    def load_spy(*args, **kwargs):
        loads.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save_spy)
    monkeypatch.setattr(torch, "load", load_spy)
    state = {"w": torch.randn(1000), "step": 3}
    path = save_checkpoint(tmp_path / "c.pt", state, {"global_step": 3})
    assert len(targets) == 1 and not hasattr(targets[0], "getbuffer")  # not an in-memory buffer
    record = json.loads(sidecar_path(path).read_text())
    assert record["size"] == path.stat().st_size and record["sha256"] == file_sha256(path)
    loaded = load_checkpoint(path)
    assert loads == [{"map_location": "cpu", "weights_only": True, "mmap": True}]
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3
    loaded["w"] += 1  # a private mapping: the file keeps what was saved
    assert torch.equal(load_checkpoint(path)["w"], state["w"])


def test_a_resumed_optimizer_owns_its_state_instead_of_the_mapped_file(tmp_path):
    """The optimizer's moments must not stay backed by the checkpoint's file (rotation deletes it)."""
    from moas.train.trained_net import adamw, load_optimizer_state

    w = torch.nn.Parameter(torch.randn(64))
    opt = adamw([w], lr=1e-3)
    w.grad = torch.randn(64)
    opt.step()
    path = save_checkpoint(tmp_path / "o.pt", {"optimizer": opt.state_dict()})
    loaded = load_checkpoint(path)["optimizer"]
    fresh = adamw([w], lr=1e-3)
    load_optimizer_state(fresh, loaded)
    mapped = {t.untyped_storage().data_ptr() for st in loaded["state"].values() for t in st.values()}
    own = [t for st in fresh.state.values() for t in st.values() if torch.is_tensor(t)]
    assert own and all(t.untyped_storage().data_ptr() not in mapped for t in own)
    assert all(torch.equal(fresh.state[w][k], v) for k, v in loaded["state"][0].items())


def test_old_checkpoints_are_reduced_to_bf16_ema_weights_read_memory_mapped(tmp_path, monkeypatch):
    paths = [_save_training_like(tmp_path, epoch_checkpoint_name(e), 10 * e) for e in range(1, 5)]
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert reduce_old_checkpoints(tmp_path, keep_full=2, mode="ema_bf16") == [paths[1], paths[0]]
    assert calls and all(c.get("weights_only") is True and c.get("mmap") is True for c in calls)
    for p in paths[2:]:  # the newest two are untouched
        assert verify_checkpoint(p) and "optimizer" in load_checkpoint(p)
    for p, step in ((paths[0], 10), (paths[1], 20)):
        record = checkpoint_record(p)
        assert record["contents"] == "ema_bf16" and record["resumable"] is False
        assert (record["epoch"], record["global_step"]) == (step // 10, step)
        state = load_checkpoint(p)
        assert set(state) == {
            *("kind", "epoch", "global_step", "model_args", "config", "text_encoder", "ema", "domain"),
            *("resumable", "contents", "moas_format"),
        }
        assert state["ema"]["model"]["w"].dtype == torch.bfloat16 and state["ema"]["num_updates"] == step
        assert torch.equal(state["ema"]["model"]["w"].float(), torch.full((64,), float(step)))
        assert state["ema"]["model"]["buf"].dtype == torch.float64  # only float32 tensors shrink
        assert set(state["domain"]) == {"enhancer"}
    assert find_latest_checkpoint(tmp_path) == paths[3]
    assert reduce_old_checkpoints(tmp_path, keep_full=2, mode="ema_bf16") == []  # nothing left to reduce
    for p in paths[2:]:
        p.write_bytes(b"corrupt")
    assert find_latest_checkpoint(tmp_path) is None  # weights-only files never resume
    assert find_latest_checkpoint(tmp_path, resumable_only=False) == paths[1]


def test_thinned_checkpoints_drop_every_optimizer_and_can_shrink_further(tmp_path):
    old, new = (_save_training_like(tmp_path, epoch_checkpoint_name(e), 10 * e) for e in (1, 2))
    assert reduce_old_checkpoints(tmp_path, keep_full=1, mode="thinned") == [old]
    state = load_checkpoint(old)
    assert "optimizer" not in state and "enh_opt" not in state["domain"] and "model" in state
    assert state["ema"]["model"]["w"].dtype == torch.float32
    assert checkpoint_record(old)["contents"] == "thinned"
    assert reduce_old_checkpoints(tmp_path, keep_full=1, mode="full") == []
    assert reduce_old_checkpoints(tmp_path, keep_full=0, mode="ema_bf16") == []  # 0: all keep their state
    assert reduce_old_checkpoints(tmp_path, keep_full=1, mode="ema_bf16") == [old]
    assert contents_of(checkpoint_record(old)) == "ema_bf16" and contents_of(checkpoint_record(new)) == "full"


def test_a_corrupt_old_checkpoint_is_left_alone(tmp_path, caplog):
    old, _new = (_save_training_like(tmp_path, epoch_checkpoint_name(e), 10 * e) for e in (1, 2))
    data = bytearray(old.read_bytes())
    data[-100] ^= 0xFF  # same size, wrong checksum
    old.write_bytes(bytes(data))
    assert reduce_old_checkpoints(tmp_path, keep_full=1, mode="ema_bf16") == []
    assert "Not reducing" in caplog.text and "corrupt" in caplog.text
    assert contents_of(checkpoint_record(old)) == "full"  # still the full checkpoint's record


def test_emergency_checkpoints_keep_the_newest_and_those_after_the_last_save(tmp_path):
    def emergency(step: int) -> Path:
        return _save_training_like(tmp_path, f"emergency_oom_epoch_{step:04d}.pt", step)

    em = {s: emergency(s) for s in (5, 12, 15, 25, 30)}
    e1, e2 = (_save_training_like(tmp_path, epoch_checkpoint_name(e), 10 * e) for e in (1, 2))
    # Newer than the newest epoch checkpoint (step 20): 25 and 30, kept even with keep=0.
    assert sorted(rotate_emergency_checkpoints(tmp_path, keep=0)) == [em[5], em[12], em[15]]
    assert {p.name for p in tmp_path.glob("emergency_*.pt")} == {em[25].name, em[30].name}
    assert not sidecar_path(em[5]).exists()
    e4 = _save_training_like(tmp_path, epoch_checkpoint_name(4), 40)
    assert rotate_emergency_checkpoints(tmp_path, keep=2) == []  # the newest two
    # Older than the newest two full checkpoints (steps 40 and 30), they shrink like the others.
    assert reduce_old_checkpoints(tmp_path, keep_full=2, mode="ema_bf16") == [em[25], e2, e1]
    assert {contents_of(checkpoint_record(p)) for p in (e4, em[30])} == {"full"}
    assert rotate_emergency_checkpoints(tmp_path, keep=1) == [em[25]]
    assert rotate_emergency_checkpoints(tmp_path / "missing", keep=1) == []


def test_the_newest_epoch_checkpoint_stays_full_beside_newer_emergency_ones(tmp_path):
    e1, e2 = (_save_training_like(tmp_path, epoch_checkpoint_name(e), 10 * e) for e in (1, 2))
    for step in (25, 27):
        _save_training_like(tmp_path, f"emergency_epoch_{step:04d}.pt", step)
    assert reduce_old_checkpoints(tmp_path, keep_full=2, mode="ema_bf16") == [e1]
    assert contents_of(checkpoint_record(e2)) == "full" and "optimizer" in load_checkpoint(e2)
    assert rotate_emergency_checkpoints(tmp_path, keep=0) == []  # both newer than the last save
