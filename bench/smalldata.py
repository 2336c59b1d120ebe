"""Small data: memorisation, adherence and KID per checkpoint, with and without image augmentation.

    python bench/smalldata.py                              # 150 demo images, cpu_tiny, 2 runs
    python bench/smalldata.py --epochs 60 --save_every 10  # shorter
    python bench/smalldata.py --augment 0 0.3 0.6          # more variants

Draws a small demo subset (the demo's manifest is moved aside, so training treats the folder as a user's
folder: best-step selection uses the folder score and the memorisation veto, not the demo table), then
trains one run per ``--augment`` probability with the same seed and the same number of steps. Every
checkpoint is scored during training by the folder's own tag model (``moas.eval.folder_score``): tag
adherence on images drawn from held-out captions, KID against the held-out images, and the share of
samples whose nearest training image is much closer than the second nearest (Gu et al. 2025, ratio < 1/3).
Each checkpoint is also measured by the demo's attribute table (held-out hair × background combinations),
a check that does not depend on the tag model. The report says which checkpoint the best-step rule picks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from moas.config import load_config  # noqa: E402
from moas.data.synthetic import generate_demo_dataset  # noqa: E402
from moas.eval.evaluate import run_eval  # noqa: E402
from moas.inference.pipeline import Pipeline  # noqa: E402
from moas.monitor.logs import setup_logging  # noqa: E402
from moas.train.loop import train  # noqa: E402

COLUMNS = (
    "folder_adherence",
    "folder_kid",
    "memorised",
    "memorised_features",
    "memorised_pixels",
    "memorised_real",
    "memorised_excess",
    "loss",
)


def make_data(n_images: int, size: int, seed: int) -> tuple[Path, Path]:
    """(image folder, folder holding the demo manifest) — apart, so training sees a plain folder."""
    data, manifest_dir = Path("data/small"), Path("data/small_manifest")
    if not (manifest_dir / "manifest.json").is_file():
        shutil.rmtree(data, ignore_errors=True)
        generate_demo_dataset(data, n_images=n_images, size=size, seed=seed, progress=False)
        manifest_dir.mkdir(parents=True, exist_ok=True)
        (data / "manifest.json").replace(manifest_dir / "manifest.json")
    return data / "train", manifest_dir


def run_variant(a: argparse.Namespace, name: str, p: float, images: Path) -> dict:
    for folder in (f"ckpt_{name}", f"runs_{name}", f"models_{name}"):
        shutil.rmtree(folder, ignore_errors=True)
    overrides = {
        "data": {"data_dir": str(images), "augment": p},
        "train": {
            "epochs": a.epochs,
            "save_every": a.save_every,
            "keep_last": 1000,
            "checkpoint_dir": f"ckpt_{name}",
            "run_dir": f"runs_{name}",
            "save_path": f"models_{name}/best_model.safetensors",
            "sample_every": 0,
            "seed": a.seed,
            **({"batch_size": a.batch_size} if a.batch_size else {}),
            **({"lr": a.lr} if a.lr else {}),
        },
        "monitor": {"val_fraction": a.val_fraction, "folder_eval_n": a.n_folder},
        **({"resources": {"cpu_threads": a.threads}} if a.threads else {}),
    }
    cfg = load_config(a.profile, overrides=overrides, use_env=False)
    t0 = time.perf_counter()
    result = train(cfg, progress=False)
    wall = time.perf_counter() - t0
    history = json.loads((result.run_dir / "best_steps.json").read_text())
    return {"name": name, "augment": p, "train_wall_s": round(wall, 1), "history": history, "cfg": cfg}


def demo_accuracy(ckpt_dir: Path, manifest_dir: Path, cfg, n: int) -> dict[int, float]:
    """Held-out attribute accuracy of every epoch checkpoint (the demo table, independent of the tag model)."""
    out = {}
    for ckpt in sorted(ckpt_dir.glob("epoch_*.pt")):
        epoch = int(ckpt.stem.split("_")[1])
        pipe = Pipeline.from_file(ckpt, torch.device("cpu"))
        r = run_eval(
            pipe,
            manifest_dir,
            n_per_split=n,
            steps=cfg.sample.steps,
            guidance_scale=cfg.sample.guidance_scale,
            sampler=cfg.sample.sampler,
            progress=False,
        )
        out[epoch] = round(float(r["held_out"]["mean"]), 4)
    return out


def table(variant: dict) -> list[dict]:
    rows = []
    demo = variant.get("demo", {})
    for h in variant["history"]["history"]:
        row = {
            "epoch": h["epoch"],
            "step": h["global_step"],
            "score": h.get("score"),
            "vetoed": h.get("vetoed"),
        }
        row.update({k: h.get(k) for k in COLUMNS})
        row["demo_held_out"] = demo.get(h["epoch"])
        rows.append(row)
    return rows


def show(variant: dict) -> None:
    best = variant["history"]["best"] or {}
    print(f"\n== augment p={variant['augment']} ({variant['train_wall_s'] / 60:.1f} min) ==")
    print(" epoch  step   F1    KID     mem  mem_f  mem_px  real  excess val_loss demo   score")
    for r in variant["rows"]:

        def f(v, w=6, d=3):
            return f"{v:{w}.{d}f}" if isinstance(v, float | int) and v is not None else " " * (w - 1) + "—"

        mark = "  <- best" if r["epoch"] == best.get("epoch") else ("  vetoed" if r["vetoed"] else "")
        print(
            f" {r['epoch']:>5} {r['step']:>5} {f(r['folder_adherence'])} {f(r['folder_kid'], 7, 4)} "
            f"{f(r['memorised'])} {f(r['memorised_features'])} {f(r['memorised_pixels'])} "
            f"{f(r['memorised_real'])} {f(r['memorised_excess'])} {f(r['loss'])} "
            f"{f(r['demo_held_out'])} {f(r['score'])}{mark}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench/_work_small", help="scratch folder")
    ap.add_argument("--profile", default="cpu_tiny")
    ap.add_argument("--n_images", type=int, default=150)
    ap.add_argument(
        "--size", type=int, default=40, help="demo image side (the augmentation crops from 1.25x)"
    )
    ap.add_argument("--epochs", type=int, default=240)
    ap.add_argument("--save_every", type=int, default=40)
    ap.add_argument("--augment", type=float, nargs="+", default=[0.0, 0.5], help="probabilities to compare")
    ap.add_argument("--val_fraction", type=float, default=0.2, help="held-out share (prompts, KID reference)")
    ap.add_argument("--n_folder", type=int, default=48, help="images per checkpoint for the folder eval")
    ap.add_argument("--demo_n", type=int, default=24, help="demo-table images per split (0: skip)")
    ap.add_argument("--batch_size", type=int, default=0, help="training batch (0: the profile's)")
    ap.add_argument("--lr", type=float, default=0.0, help="peak learning rate (0: the profile's)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per run (0: the profile's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/smalldata.json")
    a = ap.parse_args()

    out = Path(a.out).resolve()
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    setup_logging(None)
    images, manifest_dir = make_data(a.n_images, a.size, a.seed)
    variants = []
    for p in a.augment:
        name = f"aug{p:g}"
        v = run_variant(a, name, p, images)
        if a.demo_n:
            v["demo"] = demo_accuracy(Path(f"ckpt_{name}"), manifest_dir, v["cfg"], a.demo_n)
        v["rows"] = table(v)
        del v["cfg"]
        show(v)
        variants.append(v)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    settings = {k: v for k, v in vars(a).items() if k not in ("workdir", "out")}
    report = {"settings": settings, "machine": machine, "variants": variants}
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
