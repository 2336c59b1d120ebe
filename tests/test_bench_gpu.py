"""``bench/gpu.py --smoke``: the GPU benchmark's phases, run on the CPU with the tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    return module


def test_smoke_runs_every_phase_into_out_and_recovers_from_the_squeeze(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))  # the device machine's folder that comes back
    assert bench.main(["--smoke", "--steps", "3"]) == 0
    res = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert res["smoke"] and res["device"] == "cpu"
    assert all(res[p]["phase_seconds"] > 0 and "error" not in res[p] for p in bench.PHASES)
    assert "memory plan" in res["env"]["plan_12gb"] and "80.0 GB" in res["env"]["plan_card"]
    assert res["cap12"]["steps"] == 3 and res["cap12"]["images_per_sec"] > 0
    parts = res["step"]["seconds_per_step"]
    assert {"data wait", "generator forward + backward", "EMA", "optimizer (clip, AdamW, scaler)"} <= set(
        parts
    )
    assert all(v >= 0 for v in parts.values())
    large = res["large"]
    assert large["card_gb"] == 80.0 and large["channels_last_true"]["steps"] == 3
    squeeze = res["squeeze"]
    assert squeeze["passed"] and squeeze["emergency_checkpoints"] and squeeze["recovery_seconds"] > 0
    (start, end) = squeeze["micro_batch_x_accum"]
    assert end[0] < start[0] and end[0] * end[1] == start[0] * start[1]
    assert res["generate"]["seconds_per_image"] > 0 and res["generate"]["not_flat"]


def test_a_failing_phase_is_recorded_and_the_next_ones_still_run(bench, tmp_path, monkeypatch):
    def broken(a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench, "phase_env", broken)
    out = tmp_path / "gpu.json"
    assert bench.main(["--smoke", "--phases", "env,generate", "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    assert "illegal memory access" in res["env"]["error"]
    assert res["generate"]["seconds_per_image"] > 0  # it trained its own model


def test_an_unknown_phase_is_one_clear_error(bench, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--smoke", "--phases", "env,speed"])
    assert exc.value.code == 2 and "unknown phase(s) speed" in capsys.readouterr().err
