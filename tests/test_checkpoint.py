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
from moas.checkpoint import epoch_checkpoint_name, load_checkpoint, save_checkpoint, verify_checkpoint
from moas.errors import CheckpointError
from moas.io import atomic_write_bytes, file_sha256, short_hash, sidecar_path
from moas.train.rng import capture_rng_state, restore_rng_state
from moas.train.rotation import find_latest_checkpoint, rotate_checkpoints

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
