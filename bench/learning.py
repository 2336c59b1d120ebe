"""Held-out prompt-adherence accuracy against training wall time, on the demo set.

    python bench/learning.py                       # cpu_tiny, the README demo settings
    python bench/learning.py --epochs 20 --save_every 4 --n 48
    python bench/learning.py --set train.lr=5e-6 --final_only --out bench/ablation_lr5e-6.json   # an ablation
    python bench/learning.py --scene two --threads 1 --workdir bench/_bind_text --set brain.conditioning='"text"'

Trains once (saving a checkpoint every --save_every epochs; each checkpoint records its cumulative
training seconds), then evaluates every checkpoint's EMA weights with ``moas eval``'s measurement and
prints accuracy against wall time. Evaluation time is not counted as training time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from moas.checkpoint import checkpoint_record, load_checkpoint  # noqa: E402
from moas.config import load_config, tomllib  # noqa: E402
from moas.data.synthetic import generate_demo_dataset  # noqa: E402
from moas.eval.evaluate import run_eval  # noqa: E402
from moas.inference.pipeline import Pipeline  # noqa: E402
from moas.monitor.logs import setup_logging  # noqa: E402
from moas.train.loop import train  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench/_work", help="scratch folder (data, checkpoints, runs)")
    ap.add_argument("--profile", default="cpu_tiny")
    ap.add_argument("--epochs", type=int, default=None, help="default: the profile's")
    ap.add_argument("--save_every", type=int, default=4)
    ap.add_argument("--n", type=int, default=48, help="eval images per split")
    ap.add_argument("--n_images", type=int, default=1200, help="demo images")
    ap.add_argument("--out", default="bench/learning.json")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help='config override, TOML value syntax (repeatable), e.g. diffusion.prediction_type="epsilon"',
    )
    ap.add_argument("--final_only", action="store_true", help="evaluate only the last checkpoint")
    ap.add_argument(
        "--scene", choices=("one", "two"), default="one", help="two = the two-character binding set"
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = the profile's; 1 for side-by-side arms)"
    )
    a = ap.parse_args()

    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out).resolve()
    os.chdir(work)
    setup_logging(None)
    if not Path("data/demo/manifest.json").is_file():
        generate_demo_dataset("data/demo", n_images=a.n_images, size=64, seed=0, scene=a.scene)
    if json.loads(Path("data/demo/manifest.json").read_text()).get("scene", "one") != a.scene:
        raise SystemExit(
            f"{work}/data/demo holds another scene than --scene {a.scene}; use another --workdir."
        )
    overrides = {
        "data": {"data_dir": "data/demo/train"},
        "train": {
            "save_every": a.save_every,
            "keep_last": 1000,
            "checkpoint_dir": "checkpoints",
            "sample_every": 0,
        },
    }
    if a.epochs:
        overrides["train"]["epochs"] = a.epochs
    if a.threads:
        overrides["resources"] = {"cpu_threads": a.threads}
    for item in a.set:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        overrides.setdefault(section, {})[field] = tomllib.loads(f"v = {value}")["v"]
    cfg = load_config(a.profile, overrides=overrides, use_env=False)
    for old in Path("checkpoints").glob("epoch_*"):
        old.unlink()
    t0 = time.perf_counter()
    result = train(cfg, progress=True)
    wall = time.perf_counter() - t0

    rows = []
    ckpts = sorted(Path("checkpoints").glob("epoch_*.pt"))
    for ckpt in ckpts[-1:] if a.final_only else ckpts:
        meta = checkpoint_record(ckpt) or {}
        if "train_seconds" not in meta:  # older checkpoints keep it only inside the state
            meta["train_seconds"] = float(load_checkpoint(ckpt).get("train_seconds", 0.0))
        pipe = Pipeline.from_file(ckpt, torch.device("cpu"))
        r = run_eval(
            pipe,
            "data/demo",
            n_per_split=a.n,
            steps=cfg.sample.steps,
            guidance_scale=cfg.sample.guidance_scale,
            sampler=cfg.sample.sampler,
            progress=False,
        )
        rows.append(
            {
                "epoch": meta.get("epoch"),
                "train_seconds": meta.get("train_seconds"),
                "held_out": {k: v for k, v in r["held_out"].items()},
                "seen": {k: v for k, v in r["seen"].items()},
            }
        )
        h = r["held_out"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in h.items() if k != "mean")
        print(
            f"epoch {meta.get('epoch'):>3}  train {meta.get('train_seconds', 0) / 60:5.1f} min  held-out mean {h['mean']:.3f} "
            f"({parts})  seen mean {r['seen']['mean']:.3f}",
            flush=True,
        )
    machine = {
        "load_avg_end": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(),
        "threads_used": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    report = {
        "profile": a.profile,
        "scene": a.scene,
        "overrides": a.set,
        "epochs": cfg.train.epochs,
        "total_train_wall_s": round(wall, 1),
        "images_per_sec_last": round(result.images_per_sec, 1),
        "machine": machine,
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
