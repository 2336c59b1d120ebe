"""Real illustrations, not drawn circles: the folder evaluator's own quality on human-drawn art, and what a
short CPU run learns from it, judged per checkpoint by that evaluator.

    sudo apt-get install wesnoth-1.16-data          # 238 painted portraits (GPL art; never committed)
    python bench/realfolder.py                      # evaluator + moas and text conditioning, 64 px
    python bench/realfolder.py --phases evaluator   # the evaluator alone (a minute)
    python bench/realfolder.py --source DIR         # any folder of images, as a user would give it

The folder is copied as it is installed (RGBA PNGs in folders by race, files named by unit, no caption
files), so the captions come from the folder and file names (``data.captions_from_names``): for example
``undead, zombie troll``. Phases:

* ``evaluator``: the folder's tag model as a training run gets it (``load_or_train_tagger``, the step
  budget, the seed-fixed split): held-out micro F1, the F1 of the best constant answer, the verdict of
  ``moas.eval.tag_train.reliability``;
* ``moas`` / ``text``: the CPU profile trained on the folder for ``--epochs`` with the brain's conditioning
  and with text-only conditioning (same seed, same steps, timed), every checkpoint scored by the run's own
  monitor (folder adherence, KID, memorisation with the real held-out baseline, prompt adherence on the
  validation images) and the step best-step selection kept. The last sample grid of each run is copied to
  ``docs/realfolder_<phase>.png``.
* ``moas_aug``: the ``moas`` run with the non-leaky image augmentation on (``data.augment = 0.5``, as in
  the GPU profile): does a small real folder (238 images, tens of passes each) want it on the CPU too?
* ``bare``: the diffusers-example loop of ``bench/peer.py`` (images and text encodings in memory, the
  scheduler's ``add_noise``, the v-target with Min-SNR weights, AMSGrad AdamW at a constant lr, clipping,
  an EMA) training the text-conditioned network of the ``text`` run on the same folder for the same wall
  time as that run's whole training (``--bare_seconds``; default: the ``text`` run's time in ``--out``).
  Its EMA weights go into a model file shaped like the ``text`` run's (same constructor arguments).
* ``compare``: ``moas eval``'s folder evaluation (the same tag model, held-out captions, seeds and
  sampler) of the three final model files — moas's and text's best steps and the bare loop's last — and a
  grid of each one's first generated images, ``docs/realfolder_eval_<name>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from moas.config import load_config  # noqa: E402
from moas.data.dataset import ArtDataset  # noqa: E402
from moas.eval.tag_train import reliability  # noqa: E402
from moas.eval.tagger import load_or_train_tagger  # noqa: E402
from moas.inference.model_file import read_model_file, write_model_file  # noqa: E402
from moas.monitor.logs import setup_logging  # noqa: E402
from moas.train.loop import train  # noqa: E402

WESNOTH = "/usr/share/games/wesnoth/1.16/data/core/images/portraits"
COLUMNS = (
    "folder_adherence",
    "folder_score_unreliable",
    "folder_kid",
    "memorised",
    "memorised_real",
    "memorised_excess",
    "prompt_adherence",
    "loss",
)
DOCS = Path(__file__).resolve().parent.parent / "docs"


def copy_folder(source: Path, dest: Path) -> Path:
    """The source's images with their folders, as a user's folder (nothing else copied)."""
    if dest.is_dir():
        return dest
    for p in sorted(source.rglob("*")):
        if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            target = dest / p.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)
    return dest


def evaluator(a: argparse.Namespace, folder: Path) -> dict:
    cfg = load_config(a.profile, use_env=False, overrides={"data": {"resolution": a.resolution}})
    ds = ArtDataset(folder, a.resolution, "cache/preprocessed", captions_from_names=True)
    ds.validate(progress=False)
    t0 = time.perf_counter()
    tagger = load_or_train_tagger(ds, seed=0, progress=False, max_steps=cfg.monitor.tagger_steps)
    ok, why = reliability(tagger.metrics)
    captions = ds.captions()
    return {
        "images": len(ds),
        "captioned": sum(1 for c in captions if c),
        "caption_examples": captions[:: max(1, len(captions) // 6)][:6],
        "tags": len(tagger.vocab),
        "heldout": tagger.metrics["heldout"],
        "baseline_f1": tagger.metrics.get("baseline_f1"),
        "reliable": ok,
        "why": why,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_config(a: argparse.Namespace, name: str, folder: Path):
    overrides = {
        # ``moas_aug``: the moas run with the non-leaky augmentation of the GPU profile (p = 0.5).
        "data": {
            "data_dir": str(folder),
            "resolution": a.resolution,
            "augment": 0.5 if name.endswith("_aug") else 0.0,
        },
        "brain": {"conditioning": "moas" if name.startswith("moas") else "text"},
        "train": {
            "epochs": a.epochs,
            "save_every": a.save_every,
            "keep_last": 1000,
            "checkpoint_dir": f"ckpt_{name}",
            "run_dir": f"runs_{name}",
            "save_path": f"models_{name}/best_model.safetensors",
            "sample_every": a.save_every,
            "seed": a.seed,
        },
        "monitor": {"folder_eval_n": a.n_folder},
    }
    return load_config(a.profile, overrides=overrides, use_env=False)


def run(a: argparse.Namespace, name: str, folder: Path) -> dict:
    for sub in (f"ckpt_{name}", f"runs_{name}", f"models_{name}"):
        shutil.rmtree(sub, ignore_errors=True)
    cfg = run_config(a, name, folder)
    t0 = time.perf_counter()
    result = train(cfg, progress=False)
    wall = time.perf_counter() - t0
    history = json.loads((result.run_dir / "best_steps.json").read_text())
    grids = sorted((result.run_dir / "samples").glob("*.png"))
    if grids:
        shutil.copy2(grids[-1], DOCS / f"realfolder_{name}.png")
    rows = [
        {"epoch": h["epoch"], "step": h["global_step"], "score": h.get("score"), "metric": h.get("metric")}
        | {k: h.get(k) for k in COLUMNS}
        | {"vetoed": h.get("vetoed")}
        for h in history["history"]
    ]
    best = history.get("best") or {}
    return {"train_wall_s": round(wall, 1), "best_epoch": best.get("epoch"), "rows": rows}


def bare(a: argparse.Namespace, folder: Path, seconds: float) -> dict:
    """The diffusers-example loop on the folder for ``seconds`` of training; its EMA weights written as
    ``models_bare/best_model.safetensors`` in the ``text`` run's model-file shape."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peer import Peer

    template = Path("models_text/best_model.safetensors")
    if not template.is_file():
        raise SystemExit("run the text phase first: the bare loop's model file takes its shape")
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    peer = Peer(run_config(a, "text", folder), folder)
    setup = time.perf_counter() - t0
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        peer.step()
        steps += 1
    wall = time.perf_counter() - t0
    with torch.no_grad():
        for p, e in zip(peer.params, peer.ema, strict=True):
            p.copy_(e)
    mf = read_model_file(template)
    weights = {k: v.detach().clone() for k, v in peer.generator.state_dict().items()}
    assert weights.keys() == mf.weights.keys(), "the bare loop's network differs from the text run's"
    mf = replace(
        mf,
        weights=weights,
        enhancer_args=None,
        enhancer_weights=None,
        sr_args=None,
        sr_weights=None,
        provenance={**mf.provenance, "trained_by": "bench/realfolder.py bare loop", "steps": steps},
    )
    Path("models_bare").mkdir(exist_ok=True)
    write_model_file("models_bare/best_model.safetensors", mf)
    return {
        "train_wall_s": round(wall, 1),
        "setup_s": round(setup, 1),
        "steps": steps,
        "images_seen": steps * peer.batch,
    }


def compare(a: argparse.Namespace, folder: Path) -> dict:
    """``moas eval``'s folder evaluation of each final model file, and a grid of its first images."""
    from PIL import Image

    from moas.eval.folder_cli import eval_folder
    from moas.eval.folder_eval import summary_text
    from moas.inference.pipeline import Pipeline

    out = {}
    for name in ("moas", "moas_aug", "text", "bare"):
        path = Path(f"models_{name}/best_model.safetensors")
        if not path.is_file():
            continue
        images = Path(f"eval_images_{name}")
        shutil.rmtree(images, ignore_errors=True)
        pipe = Pipeline.from_file(path, torch.device("cpu"))
        r = eval_folder(pipe, folder, a.n_folder, None, None, None, a.seed, False, image_dir=images)
        print(f"\n== {name} ==\n{summary_text(r)}")
        out[name] = r
        tiles = [Image.open(p).convert("RGB") for p in sorted(images.glob("*.png"))[:8]]
        if tiles:
            w, h = tiles[0].size
            grid = Image.new("RGB", (w * len(tiles), h), "white")
            for i, t in enumerate(tiles):
                grid.paste(t, (i * w, 0))
            grid.save(DOCS / f"realfolder_eval_{name}.png")
    return out


def cell(value, decimals: int = 3) -> str:
    return "—" if value is None else f"{value:.{decimals}f}" if isinstance(value, float) else str(value)


def show(name: str, r: dict) -> None:
    """The per-checkpoint table, one tab-separated row per checkpoint."""
    print(f"\n== {name}: {r['train_wall_s'] / 60:.1f} min, best epoch {r['best_epoch']} ==")
    keys = ("epoch", "step", *COLUMNS, "score", "metric")
    print("\t".join(keys))
    for row in r["rows"]:
        print("\t".join(cell(row.get(k), 4 if k == "folder_kid" else 3) for k in keys))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=WESNOTH, help="folder of images (default: the Wesnoth portraits)")
    ap.add_argument("--phases", nargs="+", default=["evaluator", "moas", "text"])
    ap.add_argument("--workdir", default="bench/_work_real", help="scratch folder (never committed)")
    ap.add_argument("--profile", default="cpu_tiny")
    ap.add_argument("--resolution", type=int, default=64, help="training side in pixels")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--save_every", type=int, default=10)
    ap.add_argument("--n_folder", type=int, default=32, help="images per checkpoint for the folder eval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--bare_seconds",
        type=float,
        default=None,
        help="the bare loop's training time (default: the text run's)",
    )
    ap.add_argument("--out", default="bench/realfolder.json")
    a = ap.parse_args()
    source = Path(a.source)
    if not source.is_dir():
        print(f"{source} does not exist; install wesnoth-1.16-data or give --source.", file=sys.stderr)
        return 2
    out, work = Path(a.out).resolve(), Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    setup_logging(None)
    folder = copy_folder(source, work / "data")
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    settings = {k: v for k, v in vars(a).items() if k not in ("workdir", "out", "source")}
    report: dict = {
        **earlier,  # a run of some phases keeps the others' results
        "source": str(source),
        "settings": earlier.get("settings") or settings,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": psutil.cpu_count(),
            "load_1min_at_start": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
        },
    }
    for phase in a.phases:
        if phase == "evaluator":
            report["evaluator"] = evaluator(a, folder)
            print(json.dumps(report["evaluator"], indent=2))
        elif phase == "bare":
            seconds = a.bare_seconds or (report.get("text") or {}).get("train_wall_s") or 540.0
            report["bare"] = {**bare(a, folder, seconds), "settings": settings}
            print(json.dumps(report["bare"], indent=2))
        elif phase == "compare":
            report["compare"] = {**compare(a, folder), "settings": settings}
        else:
            report[phase] = run(a, phase, folder)
            report["settings"] = settings
            show(phase, report[phase])
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
