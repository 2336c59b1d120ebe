"""The trained QualityEnhancer against bicubic upscaling on held-out demo images (PSNR / SSIM).

    python bench/enhance.py                          # cpu_tiny enhancer, the demo training's step count
    python bench/enhance.py --steps 100 --max_minutes 10

Trains the enhancer with the training loop's own enhancer step (``SideNetworks.enhancer_step``: the
same degraded pairs, losses and optimizer as ``moas train``) on the demo training images, then scores it
on held-out demo images drawn with another seed, which training never saw. The base-resolution input is
the held-out image downscaled ×2 or ×4, either cleanly (antialiased bicubic) or with the training
degradations (fixed seed). Scores are against the original at 2× the base resolution, in [0, 1].
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
from tqdm.auto import tqdm  # noqa: E402

from moas.config import load_config  # noqa: E402
from moas.data.dataset import ArtDataset, collate, to_model_range  # noqa: E402
from moas.data.synthetic import generate_demo_dataset  # noqa: E402
from moas.device import seed_everything, set_threads  # noqa: E402
from moas.losses import ssim  # noqa: E402
from moas.models.enhance_sr import bicubic  # noqa: E402
from moas.train.builders import build_side_networks  # noqa: E402
from moas.train.degrade import degrade  # noqa: E402
from moas.train.side_networks import SideNetworks  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a - b).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)  # (B,), images in [0, 1]


@torch.no_grad()
def score(dom: SideNetworks, hr: torch.Tensor, factor: int, degraded: bool) -> dict[str, float]:
    size = tuple(hr.shape[-2:])
    if degraded:
        lr = degrade(hr, factor, torch.Generator().manual_seed(99))
    else:
        lr = bicubic(hr, (size[0] // factor, size[1] // factor)).clamp(-1, 1)
    dom.enhancer.eval()
    outs = {
        "bicubic": bicubic(lr, size),
        "resolution": dom.enhancer.enhance(lr, size, "resolution"),
        "full": dom.enhancer.enhance(lr, size, "full"),
    }
    ref = (hr + 1) / 2
    res = {}
    for name, y in outs.items():
        y = (y.clamp(-1, 1) + 1) / 2
        res[f"{name}_psnr"] = psnr(y, ref).mean().item()
        res[f"{name}_ssim"] = ssim(y, ref).mean().item()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench/_work_enhance", help="scratch folder (data, cache)")
    ap.add_argument("--profile", default="cpu_tiny")
    ap.add_argument("--n_train", type=int, default=1200, help="demo training images (the README demo's 1200)")
    ap.add_argument("--n_heldout", type=int, default=96, help="held-out images (another seed)")
    ap.add_argument("--steps", type=int, default=None, help="enhancer steps (default: the demo run's count)")
    ap.add_argument(
        "--max_minutes", type=float, default=0, help="stop training early after this long (0 = no cap)"
    )
    ap.add_argument("--out", default="bench/enhance.json")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is far faster on an oversubscribed CPU)"
    )
    a = ap.parse_args()

    work = Path(a.workdir)
    cfg = load_config(a.profile, overrides={"data": {"cache_dir": str(work / "cache")}})
    set_threads(a.threads)
    seed_everything(cfg.train.seed)
    hr_side = cfg.data.resolution * cfg.enhance.scale
    for name, n, seed in (("train", a.n_train, 0), ("heldout", a.n_heldout, 4242)):
        if not (work / name / "train").is_dir():
            generate_demo_dataset(work / name, n_images=n, size=hr_side, seed=seed, progress=True)
    train_set = ArtDataset(work / "train" / "train", cfg.data.resolution, cfg.data.cache_dir)
    train_set.validate(progress=False)
    cfg.losses.domain, cfg.losses.adversarial = False, False
    dom = build_side_networks(cfg, train_set, torch.device("cpu"))
    steps_per_epoch = len(train_set) // min(cfg.train.batch_size, len(train_set))
    steps = a.steps or cfg.train.epochs * steps_per_epoch // cfg.enhance.every
    held = ArtDataset(work / "heldout" / "train", hr_side, cfg.data.cache_dir)
    held.validate(progress=False)
    hr = to_model_range(collate([held[i] for i in range(len(held))])["pixels"])  # (N, 3, 2r, 2r)

    before = {
        f"x{f}_{'degraded' if d else 'clean'}": score(dom, hr, f, d) for f in (2, 4) for d in (False, True)
    }
    t0, done = time.perf_counter(), 0
    for _ in tqdm(range(steps), desc="enhancer steps"):
        dom.enhancer_step()
        done += 1
        if a.max_minutes and time.perf_counter() - t0 > 60 * a.max_minutes:
            break
    seconds = time.perf_counter() - t0
    after = {
        f"x{f}_{'degraded' if d else 'clean'}": score(dom, hr, f, d) for f in (2, 4) for d in (False, True)
    }
    result = {
        "profile": a.profile,
        "enhancer": dom.enhancer.init_args,
        "batch_size": cfg.enhance.batch_size,
        "steps_planned": steps,
        "steps_done": done,
        "train_seconds": round(seconds, 1),
        "n_train": len(train_set),
        "n_heldout": len(held),
        "base_resolution": cfg.data.resolution,
        "hr_resolution": hr_side,
        "untrained": before,
        "trained": after,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": psutil.cpu_count(),
            "load_avg": os.getloadavg(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"{done} enhancer steps in {seconds:.0f} s (load {os.getloadavg()[0]:.1f})")
    for k, v in after.items():
        print(
            f"{k:12s} PSNR bicubic {v['bicubic_psnr']:.2f} / SR {v['resolution_psnr']:.2f} / full {v['full_psnr']:.2f} dB; "
            f"SSIM {v['bicubic_ssim']:.4f} / {v['resolution_ssim']:.4f} / {v['full_ssim']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
