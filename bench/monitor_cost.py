"""What the monitoring costs: time of each checkpoint-time piece against the training itself.

Trains the cpu_tiny profile on freshly drawn demo data (``--n_images``) for ``--epochs`` epochs with a
checkpoint, validation and sample grid every epoch, and times the monitoring functions by wrapping them.
Writes JSON (``--out``) with the per-call seconds and the machine load.

    python bench/monitor_cost.py --n_images 400 --epochs 2 --out bench/monitor_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n_images", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--profile", default="cpu_tiny")
    ap.add_argument("--out", default="bench/monitor_cost.json")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import moas.eval.validate as val
    import moas.monitor.run_monitor as mon
    from moas.config import load_config
    from moas.data.synthetic import generate_demo_dataset
    from moas.train.loop import train

    times: dict[str, list[float]] = defaultdict(list)

    def timed(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[label].append(time.perf_counter() - t0)

        setattr(owner, name, wrapper)

    timed(mon.RunMonitor, "on_checkpoint", "on_checkpoint (all of it)")
    timed(val.Validator, "_denoise_metrics", "validation denoising (loss/PSNR/SSIM/adherence)")
    timed(val.Validator, "demo_accuracy", "demo held-out accuracy (moas eval, eval_n per split)")
    timed(mon, "visualize_training_progress", "progress.png")
    timed(mon.RunMonitor, "sample_grid", "sample grid + self-critique + creativity")
    timed(mon.RunMonitor, "observe_batch", "observe_batch (per step, measured every measure_every)")

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        generate_demo_dataset("data/demo", n_images=a.n_images, size=32, seed=0, progress=False)
        cfg = load_config(
            a.profile,
            overrides={
                "data": {"data_dir": "data/demo/train"},
                "train": {"epochs": a.epochs, "save_every": 1, "sample_every": 1},
            },
            use_env=False,
        )
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        result = train(cfg, progress=False, dashboard=False)
        total = time.perf_counter() - t0
        history = json.loads((result.run_dir / "best_steps.json").read_text())
    report = {
        "profile": a.profile,
        "n_images": a.n_images,
        "epochs": a.epochs,
        "steps": result.global_step,
        "total_s": round(total, 1),
        "calls_s": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "best_steps": history,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "best_steps"}, indent=2))


if __name__ == "__main__":
    main()
