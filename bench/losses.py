"""Domain losses on vs off at equal training wall time: held-out accuracy and an edge-sharpness metric.

    python bench/losses.py --off_steps 300            # the "off" arm trains 300 steps; "on" gets equal time
    python bench/losses.py --off_steps 40 --n 16      # a small budget

1. The cost of one training step with and without the domain losses (+ discriminator) is timed in one
   process, alternating off/on steps (so machine load hits both alike); the ratio gives the "on" arm's step
   count for equal wall time.
2. Each arm trains from the same seed on the demo set (enhancer training off in both: it is the same cost
   in both arms and does not touch the diffusion model), then ``moas eval``'s measurement scores held-out
   prompt adherence; sharpness is the mean Sobel magnitude of the generated images relative to that of
   the real demo images (1.0 = as sharp as the data).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from moas.config import load_config  # noqa: E402
from moas.data.dataset import ArtDataset, to_model_range  # noqa: E402
from moas.data.synthetic import generate_demo_dataset  # noqa: E402
from moas.diffusion.schedule import NoiseSchedule, make_train_scheduler  # noqa: E402
from moas.eval.evaluate import run_eval  # noqa: E402
from moas.inference.pipeline import Pipeline  # noqa: E402
from moas.losses import sobel_magnitude  # noqa: E402
from moas.models.generator import MoasGenerator  # noqa: E402
from moas.monitor.logs import setup_logging  # noqa: E402
from moas.text.encoder import TextEncoder  # noqa: E402
from moas.train.builders import build_side_networks  # noqa: E402
from moas.train.loop import train  # noqa: E402

ARMS = {
    "off": {"losses": {"domain": False, "adversarial": False}},
    "on": {"losses": {"domain": True, "adversarial": True, "disc_warmup_steps": 20}},
    "domain_only": {"losses": {"domain": True, "adversarial": False}},  # isolates the GAN term
}


def step_cost_ratio(cfg_off, cfg_on, rounds: int = 4) -> float:
    """Seconds per training step of ``cfg_on`` / of ``cfg_off``, timed alternately in one process."""
    ds = ArtDataset(cfg_off.data.data_dir, cfg_off.data.resolution, cfg_off.data.cache_dir)
    ds.validate(progress=False)
    b = min(cfg_off.train.batch_size, len(ds))
    x0 = to_model_range(torch.stack([ds[i]["pixels"] for i in range(b)]))
    enc = TextEncoder(cfg_off.text.model_name).encode(ds.captions()[:b])
    text = {"tokens": enc.tokens, "mask": enc.mask, "tags": enc.tags, "tag_mask": enc.tag_mask}
    from dataclasses import asdict

    model = MoasGenerator(cfg_off.data.resolution, asdict(cfg_off.model), asdict(cfg_off.text))
    sched = NoiseSchedule(make_train_scheduler(cfg_off.diffusion), cfg_off.diffusion.prediction_type, 5.0)
    doms = {
        "off": build_side_networks(cfg_off, ds, torch.device("cpu")),
        "on": build_side_networks(cfg_on, ds, torch.device("cpu")),
    }
    times = {"off": [], "on": []}
    for r in range(rounds + 1):
        for arm in ("off", "on"):
            t0 = time.perf_counter()
            t = torch.randint(0, sched.num_timesteps, (b,))
            noise = torch.randn_like(x0)
            x_t = sched.add_noise(x0, noise, t)
            pred = model(x_t, t, text).pred
            loss = F.mse_loss(pred, sched.target(x0, noise, t))
            x0_pred = sched.predict_x0(x_t, pred, t) if doms[arm].uses_x0 else None
            extra, _ = doms[arm].generator_loss(x0, x0_pred, t, sched, global_step=100)
            (loss if extra is None else loss + extra).backward()
            model.zero_grad(set_to_none=True)
            doms[arm].after_step(x0, x0_pred.detach() if x0_pred is not None else None, 100)
            if r:  # the first round warms up
                times[arm].append(time.perf_counter() - t0)
    return float(np.median(times["on"]) / np.median(times["off"]))


def sharpness(folder: Path) -> float:
    vals = []
    for p in sorted(folder.glob("*.png")):
        x = to_model_range(
            torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)[None]
        )
        vals.append(sobel_magnitude(x).mean().item())
    return float(np.mean(vals))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench/_work_losses")
    ap.add_argument("--profile", default="cpu_tiny")
    ap.add_argument("--n_images", type=int, default=1200)
    ap.add_argument("--off_steps", type=int, default=300, help="optimizer steps of the 'off' arm")
    ap.add_argument("--n", type=int, default=48, help="eval images per split")
    ap.add_argument("--out", default="bench/losses.json")
    ap.add_argument(
        "--arms",
        nargs="+",
        default=["off", "on"],
        choices=list(ARMS),
        help="arms to train (each gets the 'off' arm's wall time: off_steps / its step-cost ratio)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is far faster on an oversubscribed CPU)"
    )
    a = ap.parse_args()
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out).resolve()
    os.chdir(work)
    setup_logging(None)
    torch.set_num_threads(a.threads)
    if not Path("data/demo/manifest.json").is_file():
        generate_demo_dataset("data/demo", n_images=a.n_images, size=64, seed=0)
    base = {
        "data": {"data_dir": "data/demo/train"},
        "enhance": {"train": False},
        "train": {"sample_every": 0, "save_every": 1000},
        "resources": {"cpu_threads": a.threads},
    }
    cfgs = {
        arm: load_config(a.profile, overrides={**base, **o}, use_env=False)
        for arm, o in ARMS.items()
        if arm in a.arms or arm == "off"
    }
    ratios = {arm: 1.0 if arm == "off" else step_cost_ratio(cfgs["off"], cfg) for arm, cfg in cfgs.items()}
    steps = {arm: max(1, round(a.off_steps / r)) for arm, r in ratios.items()}
    base_cfg = cfgs["off"]
    cfgs = {arm: cfg for arm, cfg in cfgs.items() if arm in a.arms}
    ratio = ratios.get("on", max(ratios.values()))
    print(f"step cost / off: {ratios}; steps: {steps}", flush=True)
    real = sharpness_ref = None
    ds = ArtDataset("data/demo/train", base_cfg.data.resolution, base_cfg.data.cache_dir)
    ds.validate(progress=False)
    real = torch.stack([to_model_range(ds[i]["pixels"]) for i in range(0, len(ds), max(1, len(ds) // 200))])
    sharpness_ref = sobel_magnitude(real).mean().item()
    report = {
        "profile": a.profile,
        "step_cost_ratio_on_off": ratio,
        "step_cost_ratios": ratios,
        "steps": steps,
        "arms": {},
        "load_avg": [],
    }
    for arm, cfg in cfgs.items():
        cfg.train.max_steps = steps[arm]
        cfg.train.epochs = max(1, -(-steps[arm] * cfg.train.batch_size // len(ds)))
        cfg.train.save_path = f"models/{arm}.safetensors"
        cfg.train.checkpoint_dir = f"checkpoints_{arm}"
        t0 = time.perf_counter()
        train(cfg, progress=True)
        wall = time.perf_counter() - t0
        pipe = Pipeline.from_file(cfg.train.save_path, torch.device("cpu"))
        img_dir = Path(f"images_{arm}")
        r = run_eval(
            pipe,
            "data/demo",
            n_per_split=a.n,
            steps=cfg.sample.steps,
            guidance_scale=cfg.sample.guidance_scale,
            sampler=cfg.sample.sampler,
            progress=False,
            image_dir=img_dir,
        )
        report["arms"][arm] = {
            "steps": steps[arm],
            "train_wall_s": round(wall, 1),
            "held_out": r["held_out"],
            "seen": r["seen"],
            "sharpness_rel": sharpness(img_dir) / sharpness_ref,
        }
        report["load_avg"].append(os.getloadavg())
        h = r["held_out"]
        print(
            f"{arm}: {steps[arm]} steps, {wall:.0f} s, held-out {h['mean']:.3f}, sharpness {report['arms'][arm]['sharpness_rel']:.3f}",
            flush=True,
        )
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
