"""GPU check: does the rtx3060_12gb profile fit a 12 GB card, and does OOM recovery work?

Run on a bigger GPU (H100/H200): the process is limited to 12 GB with
``torch.cuda.set_per_process_memory_fraction`` so it behaves like the RTX 3060.

  python bench/gpu_12gb_check.py --data_dir data/demo/train --steps 30           # phase A + B
  python bench/gpu_12gb_check.py --data_dir data/demo/train --phase fit

Phase A ("fit"): train the rtx3060_12gb profile at its default batch for ``--steps`` optimizer steps under
the 12 GB cap; passes when no out-of-memory recovery happened (micro-batch unchanged) and reports peak
memory and images/s. Phase B ("squeeze"): the same, but after ``--squeeze_at`` steps the cap is lowered to
``--squeeze_gb`` (default 3 GB) so the next step runs out of memory; passes when training continued with a
smaller micro-batch and the same effective batch, and an emergency_oom_epoch_*.pt checkpoint verifies.
Writes bench/gpu_12gb_check.json. Not run in the test suite (needs a CUDA GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moas.checkpoint import verify_checkpoint  # noqa: E402
from moas.config import load_config  # noqa: E402
from moas.monitor.logs import setup_logging  # noqa: E402
from moas.train.loop import Trainer, build_trainer  # noqa: E402

GB = 1024**3


def cap(gb: float) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gb * GB / total), 0)


def make_trainer(args, root: Path) -> Trainer:
    over = {
        "data": {"data_dir": args.data_dir, "cache_dir": str(root / "cache")},
        "train": {
            "checkpoint_dir": str(root / "ckpt"),
            "run_dir": str(root / "runs"),
            "save_path": str(root / "model.pt"),
            "max_steps": args.steps,
            "sample_every": 0,
            "save_every": 10**6,
            "epochs": 260,
        },
        "resources": {"device": "cuda"},
    }
    return build_trainer(load_config("rtx3060_12gb", None, over, use_env=False), progress=False)


def phase_fit(args, root: Path) -> dict:
    cap(12.0)
    torch.cuda.reset_peak_memory_stats()
    t = make_trainer(args, root)
    start = (t.state.micro_batch, t.state.grad_accum)
    t0 = time.perf_counter()
    r = t.run()
    return {
        "phase": "fit",
        "passed": (r.micro_batch, r.grad_accum) == start,
        "micro_batch_x_accum": start,
        "steps": r.global_step,
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB,
        "images_per_sec": r.images_per_sec,
        "seconds": time.perf_counter() - t0,
    }


def phase_squeeze(args, root: Path) -> dict:
    cap(12.0)
    t = make_trainer(args, root)
    start = (t.state.micro_batch, t.state.grad_accum)
    real_boundary = t._at_boundary

    def boundary_then_squeeze() -> bool:
        stop = real_boundary()
        if t.state.global_step == args.squeeze_at:
            torch.cuda.empty_cache()
            cap(args.squeeze_gb)
        return stop

    t._at_boundary = boundary_then_squeeze
    r = t.run()
    emergencies = sorted((root / "ckpt").glob("emergency_oom_epoch_*.pt"))
    return {
        "phase": "squeeze",
        "passed": bool(emergencies)
        and r.micro_batch < start[0]
        and r.micro_batch * r.grad_accum == start[0] * start[1]
        and r.global_step == args.steps,
        "start_micro_x_accum": start,
        "end_micro_x_accum": (r.micro_batch, r.grad_accum),
        "emergency_checkpoints": [p.name for p in emergencies],
        "emergency_verified": all(verify_checkpoint(p) for p in emergencies),
        "steps": r.global_step,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="training images (e.g. moas make-data --size 128)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--squeeze_at", type=int, default=5, help="step after which the memory cap is lowered")
    p.add_argument("--squeeze_gb", type=float, default=3.0)
    p.add_argument("--phase", choices=["fit", "squeeze", "both"], default="both")
    p.add_argument("--out", default="bench/gpu_12gb_check.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_12gb_check: needs a CUDA GPU", file=sys.stderr)
        return 2
    setup_logging(None)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        if args.phase in ("fit", "both"):
            results["fit"] = phase_fit(args, Path(tmp) / "fit")
        if args.phase in ("squeeze", "both"):
            results["squeeze"] = phase_squeeze(args, Path(tmp) / "squeeze")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0 if all(v.get("passed") for v in results.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
