"""``moas demo``: the README's first command. It runs the four commands a new user would type — draw the
demo data, train the CPU profile on it, generate one prompt through the cascade, evaluate the model —
printing each before it runs, then a table of where the time went (training split into its phases, read
from the run's ``timings.json``) and the disk the demo's folders take, also written to ``demo_timings.json``.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from moas.io import atomic_write_bytes
from moas.monitor.phases import load_timings, phase_table

DEMO_PROMPT = "1girl, red hair, blue eyes, forest"
MODEL = "models/best_model.safetensors"
TIMINGS_FILE = "demo_timings.json"


def demo_commands(data: str, profile: str, prompt: str, output: str) -> list[tuple[str, list[str]]]:
    """(name, argv) of the demo's commands, in order."""
    return [
        ("make-data", ["make-data", "--out", data]),
        ("train", ["train", "--profile", profile, "--data_dir", f"{data}/train"]),
        ("generate", ["generate", "--model", MODEL, "--prompt", prompt, "--output", output]),
        ("eval", ["eval", "--model", MODEL, "--data_dir", data]),
    ]


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist); a file with several names (the
    hard-linked ``last_model`` beside ``best_model``) counts once, as on the disk."""
    if not path.is_dir():
        return 0
    seen = {(s.st_dev, s.st_ino): s.st_size for s in (p.stat() for p in path.rglob("*") if p.is_file())}
    return sum(seen.values())


def newest_run(runs: Path, since: float) -> Path | None:
    """The run folder under ``runs`` whose timings were written last, after ``since`` (a time.time())."""
    found = [p.parent for p in runs.glob("*/timings.json") if p.stat().st_mtime >= since]
    return max(found, key=lambda p: (p / "timings.json").stat().st_mtime) if found else None


def timing_rows(seconds: dict[str, float], train_phases: dict[str, float] | None) -> dict[str, float]:
    """The table's rows: each command, with the training's own phases indented under it."""
    rows: dict[str, float] = {}
    for name, s in seconds.items():
        rows[name] = s
        if name == "train" and train_phases:
            rows |= {f"  {phase}": v for phase, v in train_phases.items()}
    return rows


def run_demo(
    run: Callable[[list[str]], int],
    data: str = "data/demo",
    profile: str = "cpu_tiny",
    prompt: str = DEMO_PROMPT,
    output: str = "result.png",
) -> int:
    """Run the demo through ``run`` (the CLI's ``main``); the first failing command's exit code, else 0."""
    seconds: dict[str, float] = {}
    train_phases = None
    started, wall = time.perf_counter(), time.time()
    for name, argv in demo_commands(data, profile, prompt, output):
        print(f"\n$ moas {shlex.join(argv)}", flush=True)
        t = time.perf_counter()
        code = run(argv)
        seconds[name] = time.perf_counter() - t
        if code != 0:
            print(f"moas demo: 'moas {argv[0]}' failed (exit code {code}); the steps before it are kept.")
            return code
        if name == "train":
            run_dir = newest_run(Path("runs"), wall)
            timings = load_timings(run_dir) if run_dir else None
            train_phases = timings["phases"] if timings else None
    total = time.perf_counter() - started
    rows = timing_rows(seconds, train_phases)
    print("\nWhere the demo's time went (the indented rows split the training; shares of the whole):")
    print(phase_table(rows, total, title="command"))
    disk = {d: folder_bytes(Path(d)) for d in (data, "cache", "checkpoints", "models", "runs", "logs")}
    print(
        "Disk: "
        + ", ".join(f"{d} {b / 1e6:.0f} MB" for d, b in disk.items())
        + f"; {sum(disk.values()) / 1e9:.2f} GB in all."
    )
    record = {"commands": seconds, "train_phases": train_phases, "total": total, "disk_bytes": disk}
    atomic_write_bytes(Path(TIMINGS_FILE), json.dumps(record, indent=2).encode())
    print(f"(also in {TIMINGS_FILE}; the model is {MODEL}, the image {output})")
    return 0
