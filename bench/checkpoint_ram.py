"""Host RAM while a checkpoint is written and read: peak RSS above the process's resident size before.

    python bench/checkpoint_ram.py                 # a ~1 GB checkpoint (float32 tensors like a model's)
    python bench/checkpoint_ram.py --gb 0.25       # smaller

Each measurement runs in a fresh process (``ru_maxrss`` is a high-water mark): *save* builds the state, then
calls ``moas.checkpoint.save_checkpoint``; *load* calls ``load_checkpoint`` on that file, then reads every
tensor once (``sum``), as restoring a model does. The numbers are the peak resident size above the size
just before the call, in GB; for a checkpoint of size S a save that assembles the file in memory costs ≥ S,
a load that reads the file into memory before deserialising it ≥ 2 S. A memory-mapped load's resident pages
are the file's (page cache the OS can drop under pressure), so the load also reports the growth of the
process's anonymous memory (``RssAnon``) after every tensor was read.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 1024**3


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / GB


def anon_gb() -> float:
    """Resident memory that is the process's own (not pages of a mapped file, which the OS can drop)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) * 1024 / GB


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # kB on Linux


def child(mode: str, path: Path, gb: float) -> dict:
    import torch

    from moas.checkpoint import load_checkpoint, save_checkpoint

    if mode == "save":
        n = int(gb * GB / 4 / 64)  # 64 tensors, like a model's many parameters
        state = {"model": {f"w{i}": torch.randn(n) for i in range(64)}, "step": 1}
        before = rss_gb()
        save_checkpoint(path, state, {"global_step": 1})
        return {"before_gb": before, "extra_gb": peak_gb() - before, "file_gb": path.stat().st_size / GB}
    before, anon = rss_gb(), anon_gb()
    state = load_checkpoint(path)
    total = sum(float(t.sum()) for t in state["model"].values())  # every page read once
    return {"before_gb": before, "extra_gb": peak_gb() - before, "anon_gb": anon_gb() - anon, "sum": total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (default 1)")
    ap.add_argument("--child", choices=["save", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.path, a.gb)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.pt"
        rows = {}
        for mode in ("save", "load"):
            cmd = [sys.executable, __file__, "--child", mode, "--path", str(path), "--gb", str(a.gb)]
            rows[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    size = rows["save"]["file_gb"]
    print(f"checkpoint {size:.2f} GB")
    for mode in ("save", "load"):
        r = rows[mode]
        print(f"{mode}: peak RSS {r['extra_gb']:.2f} GB above the {r['before_gb']:.2f} GB before")
    print(f"load: the process's own memory after reading every tensor: +{rows['load']['anon_gb']:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
