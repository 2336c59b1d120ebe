"""``bench/gpu.py --smoke``: the GPU benchmark's phases, run on the CPU with the tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


def test_smoke_runs_every_phase_and_recovers_from_the_squeeze(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "gpu.json"
    assert bench.main(["--smoke", "--steps", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["smoke"] and res["device"] == "cpu"
    for phase in ("bf16", "fp32", "squeeze"):
        assert res[phase]["steps"] == 3 and res[phase]["images_per_sec"] > 0, phase
    squeeze = res["squeeze"]
    assert squeeze["passed"] and squeeze["emergency_checkpoints"]
    (start, end) = squeeze["micro_batch_x_accum"]
    assert end[0] < start[0] and end[0] * end[1] == start[0] * start[1]
    assert 0 < res["mfu"] < 1 and res["generate"]["seconds_per_image"] > 0
    assert "skipped" in res["compile"]
