"""Step time of the CPU demo against a busy core: 1 or 2 torch threads, OpenMP spinning or passive waits.

    python bench/threads.py            # writes bench/threads.json (about 5 minutes on an idle 2-core box)

The last two settings start at 2 threads with the trainer's thread governor (``moas.train.threads``),
polled after every step with a 1-second interval; "final_threads" is where it settled.

Each setting runs in its own process (OpenMP reads its environment once): the ``cpu_tiny`` generator's
training step (forward, backward, AdamW; batch 32 at 32 px) ``--steps`` times, reporting the median step
time. "busy" runs a competing process that keeps one core at 100 % (a pure-Python loop) for the whole
measurement. Compare within one run of this script: absolute times differ between machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import os, statistics, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from moas.config import load_config
from moas.models.generator import MoasGenerator
from moas.text.encoder import HASH_ID, TextEncoder
from moas.text.inputs import caption_inputs
from moas.train.builders import generator_args
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
steps = int(sys.argv[2])
governor = None
if sys.argv[3] == "governed":  # the trainer's thread governor, polled once per step as the trainer does
    from moas.train.threads import ThreadGovernor
    governor = ThreadGovernor(int(sys.argv[1]), interval_s=float(sys.argv[4]))
cfg = load_config("cpu_tiny", use_env=False)
model = MoasGenerator(**generator_args(cfg)).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
b, r = cfg.train.batch_size, cfg.data.resolution
text = caption_inputs(TextEncoder(require_id=HASH_ID), ["1girl, red hair, blue eyes, forest"] * b, "cpu")
x, t = torch.randn(b, 3, r, r), torch.randint(0, 1000, (b,))
times = []
for i in range(steps + 2):
    t0 = time.perf_counter()
    model(x, t, text).pred.square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= 2:
        times.append(time.perf_counter() - t0)
    if governor is not None:
        governor.poll()
print(statistics.median(times), torch.get_num_threads())
"""


def one(threads: int, busy: bool, passive: bool, steps: int, governed: bool = False) -> tuple[float, int]:
    """(median step seconds, the thread count at the end) of one setting in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                WORKER,
                str(threads),
                str(steps),
                "governed" if governed else "fixed",
                "1.0",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    median, final = out.stdout.strip().splitlines()[-1].split()
    return float(median), int(final)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "bench" / "threads.json"))
    a = ap.parse_args(argv)
    rows = []
    settings = [
        (t, busy, passive, False) for passive in (False, True) for t in (2, 1) for busy in (False, True)
    ]
    # The trainer's governor (moas.train.threads): starts at 2 threads, reads the machine every second.
    settings += [(2, busy, False, True) for busy in (False, True)]
    for threads, busy, passive, governed in settings:
        s, final = one(threads, busy, passive, a.steps, governed)
        row = {
            "threads": threads,
            "busy_core": busy,
            "omp_passive": passive,
            "governed": governed,
            "final_threads": final,
            "step_s": round(s, 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    idle2 = next(
        r["step_s"]
        for r in rows
        if r["threads"] == 2 and not r["busy_core"] and not r["omp_passive"] and not r["governed"]
    )
    for r in rows:
        r["vs_2_threads_idle"] = round(r["step_s"] / idle2, 2)
    from moas.device import cpu_name

    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "rows": rows, "median_of": a.steps}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
