"""``moas demo`` (the README's first command) and the phase clock behind its table of where the time went.

The demo itself takes minutes; here its orchestration runs with a stand-in for the CLI, and the clock with
sleeps. The README must show the commands the demo runs (``demo_commands``), so the two cannot drift."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pytest

from moas.demo import DEMO_PROMPT, demo_commands, folder_bytes, run_demo
from moas.monitor.phases import PhaseClock, load_timings, phase_table, save_timings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_nested_phases_pause_the_outer_one_and_the_rest_is_other(tmp_path):
    clock = PhaseClock()
    with clock("steps"):
        time.sleep(0.05)
        with clock("saves"):
            time.sleep(0.1)
        time.sleep(0.05)
    time.sleep(0.05)
    phases, total = clock.table()
    assert phases["steps"] == pytest.approx(0.1, abs=0.04) and phases["saves"] == pytest.approx(0.1, abs=0.04)
    assert phases["other"] == pytest.approx(0.05, abs=0.04)
    assert sum(phases.values()) == pytest.approx(total, abs=0.02)
    record = save_timings(tmp_path, clock)
    assert load_timings(tmp_path) == record and load_timings(tmp_path / "none") is None
    table = phase_table({"a": 1.0, "b": 3.0}).splitlines()
    assert table[1].split() == ["a", "1.0", "25.0%"] and table[-1].split() == ["total", "4.0", "100.0%"]


def fake_cli(log: list[list[str]], fail: str | None = None):
    """Stands in for ``moas.cli.main``: records each command; ``train`` leaves a run with its timings."""

    def run(argv: list[str]) -> int:
        log.append(argv)
        if argv[0] == fail:
            return 3
        if argv[0] == "train":
            clock = PhaseClock()
            with clock("generator steps"):
                time.sleep(0.01)
            (Path("runs") / "000-cpu_tiny").mkdir(parents=True)
            save_timings(Path("runs") / "000-cpu_tiny", clock)
            Path("checkpoints").mkdir()
            Path("checkpoints/epoch_0001.pt").write_bytes(b"x" * 2000)
        return 0

    return run


def test_the_demo_runs_its_four_commands_and_tells_where_the_time_went(workdir, capsys):
    log: list[list[str]] = []
    assert run_demo(fake_cli(log)) == 0
    assert log == [argv for _, argv in demo_commands("data/demo", "cpu_tiny", DEMO_PROMPT, "result.png")]
    assert [a[0] for a in log] == ["make-data", "train", "generate", "eval"]
    out = capsys.readouterr().out
    assert "$ moas train --profile cpu_tiny --data_dir data/demo/train" in out
    rows = {line.split()[0] for line in out.splitlines()[-12:] if line.strip()}
    assert {"make-data", "train", "generator", "generate", "eval", "total"} <= rows
    record = json.loads(Path("demo_timings.json").read_text())
    assert set(record["commands"]) == {"make-data", "train", "generate", "eval"}
    assert set(record["train_phases"]) == {"generator steps", "other"}
    assert record["disk_bytes"]["checkpoints"] == 2000 and "0.00 GB in all" in out


def test_a_failing_command_stops_the_demo_with_its_exit_code(workdir, capsys):
    log: list[list[str]] = []
    assert run_demo(fake_cli(log, fail="train")) == 3
    assert [a[0] for a in log] == ["make-data", "train"]
    assert "'moas train' failed (exit code 3)" in capsys.readouterr().out
    assert not Path("demo_timings.json").exists()


def test_the_readme_shows_the_demo_and_the_commands_it_runs():
    text = README.read_text()
    assert "&& moas demo" in text
    for _, argv in demo_commands("data/demo", "cpu_tiny", DEMO_PROMPT, "result.png"):
        assert f"moas {shlex.join(argv)}" in text, argv


def test_folder_bytes_counts_a_hard_linked_file_once(tmp_path):
    (tmp_path / "best.safetensors").write_bytes(b"x" * 1000)
    os.link(tmp_path / "best.safetensors", tmp_path / "last.safetensors")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "card.md").write_bytes(b"y" * 10)
    assert folder_bytes(tmp_path) == 1010 and folder_bytes(tmp_path / "missing") == 0
