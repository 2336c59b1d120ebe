"""The main thread's wait for the side networks' images per training step: loading on the main thread (the
old way, ``--workers 0``) against loading ahead in DataLoader worker processes (``moas.train.side_batches``).

    python bench/side_batches.py                      # 96 demo images at cpu_tiny's sizes; 0 and 2 workers
    python bench/side_batches.py --workers 0 1 2 --passes 4 --step_ms 200 --out /tmp/side.json

Demo images (``moas make-data``'s generator, at the super-resolution stage's side) are drawn into a temporary
folder and validated at ``cpu_tiny``'s base resolution. For each worker count, a fresh cache: the run's
``SRStageTraining`` and ``SideNetworks`` (the enhancer) with ``cpu_tiny``'s batch sizes and scales, then
``--passes`` passes over the images of one super-resolution batch (``SRStageTraining.batch``: images, crops,
draws) and one enhancer batch (``SideNetworks._hr_batch``) per step, timed on the main thread. Between
steps the main thread sleeps ``--step_ms`` (the generator's step, during which workers load ahead; a sleep
leaves the cores to them, so on a CPU-bound run the gain is smaller). Reported per worker count: the start
of the loaders (on the main thread, as the run's builders start them), the first step (what is left of the
workers' start-up, and the first entries), the first pass (cache entries built) and the later passes
(entries read from the cache and RAM), as milliseconds of waiting per step. Compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

from moas.config import load_config  # noqa: E402
from moas.config_sections import LossConfig  # noqa: E402
from moas.data.dataset import ArtDataset  # noqa: E402
from moas.data.synthetic import generate_demo_dataset  # noqa: E402
from moas.text.bank import TextBank  # noqa: E402
from moas.text.encoder import HASH_ID, TextEncoder  # noqa: E402
from moas.train.side_batches import hr_dataset  # noqa: E402
from moas.train.side_networks import SideNetworks  # noqa: E402
from moas.train.sr_stage import SRStageTraining  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="cpu_tiny", help="the sizes: base resolution, scales, batch sizes")
    p.add_argument("--n_images", type=int, default=96)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts compared")
    p.add_argument(
        "--passes", type=int, default=3, help="passes over the images (the first builds the cache)"
    )
    p.add_argument("--step_ms", type=float, default=100.0, help="the generator's step, slept between steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/side_batches.json")
    return p.parse_args(argv)


def side_parts(cfg, data: Path, cache: Path, workers: int) -> tuple[SRStageTraining, SideNetworks]:
    """The super-resolution stage and the enhancer of a run of ``cfg`` on ``data``, each loading its images
    with exactly ``workers`` processes (a run caps the count at the machine's threads) and a RAM cache of
    ``data.ram_cache_gb``, as in training."""
    ds = ArtDataset(data, cfg.data.resolution, cache)
    ds.validate(progress=False)
    ram = int(cfg.data.ram_cache_gb * 2**30)
    seed, cpu = cfg.train.seed, torch.device("cpu")
    kw = {"generator_lr": cfg.train.lr, "weight_decay": 0.0, "term_clamp": 10.0, "max_grad_norm": 1.0}
    losses = LossConfig(domain=False, adversarial=False)
    enhancer = SideNetworks(
        losses, cfg.enhance, ds, cpu, seed=seed, loader_workers=workers, ram_cache_bytes=ram, **kw
    )
    bank = TextBank(TextEncoder(require_id=HASH_ID), ds.captions(), progress=False)
    hr = hr_dataset(ds, cfg.data.resolution * cfg.sr.scale, ram)
    stage = SRStageTraining(cfg.sr, hr, bank, cpu, seed, loader_workers=workers)
    return stage, enhancer


def measure(args, data: Path, workers: int) -> dict:
    cfg = load_config(args.profile, use_env=False)
    with tempfile.TemporaryDirectory() as cache:
        stage, enhancer = side_parts(cfg, data, Path(cache), workers)
        per_pass = -(-len(stage.hr) // cfg.sr.batch_size)
        waits = []
        try:
            t0 = time.perf_counter()
            stage.start_loading()  # as the run's builders do: the workers start before the first step
            enhancer.start_loading()
            start_ms = 1000 * (time.perf_counter() - t0)
            for _ in range(per_pass * args.passes):
                t0 = time.perf_counter()
                stage.batch()
                enhancer._hr_batch()
                waits.append(1000 * (time.perf_counter() - t0))
                stage.net.steps += 1  # as after a step that was taken
                enhancer.enh_net.steps += 1
                time.sleep(args.step_ms / 1000)
        finally:
            stage.close()
            enhancer.close()
    later = waits[per_pass:] or [float("nan")]
    return {
        "workers": workers,
        "steps": len(waits),
        "start_ms": round(start_ms, 1),
        "first_step_ms": round(waits[0], 1),
        "first_pass_mean_ms": round(statistics.mean(waits[1:per_pass] or waits[:1]), 2),
        "later_mean_ms": round(statistics.mean(later), 2),
        "later_median_ms": round(statistics.median(later), 2),
        "later_max_ms": round(max(later), 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.profile, use_env=False)
    side = cfg.data.resolution * max(cfg.sr.scale, cfg.enhance.scale)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo_dataset(Path(tmp), n_images=args.n_images, size=side, seed=args.seed, progress=False)
        for workers in args.workers:
            results.append(measure(args, Path(tmp) / "train", workers))
            r = results[-1]
            print(
                f"{workers} workers: start {r['start_ms']:.0f} ms, first step {r['first_step_ms']:.0f} ms, first pass "
                f"{r['first_pass_mean_ms']:.1f} ms/step, later {r['later_mean_ms']:.1f} ms/step "
                f"(median {r['later_median_ms']:.1f}, max {r['later_max_ms']:.1f})",
                flush=True,
            )
    out = {
        "profile": args.profile,
        "n_images": args.n_images,
        "base_resolution": cfg.data.resolution,
        "sr": {"side": cfg.data.resolution * cfg.sr.scale, "batch_size": cfg.sr.batch_size},
        "enhancer": {"side": cfg.data.resolution * cfg.enhance.scale, "batch_size": cfg.enhance.batch_size},
        "step_ms": args.step_ms,
        "results": results,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": psutil.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "load_avg": os.getloadavg(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
