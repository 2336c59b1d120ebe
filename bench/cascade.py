"""The cascade: diffusion super-resolution vs the enhancer vs bicubic, from the same base images.

    python bench/cascade.py --model models/best_model.safetensors --data_dir data/demo
    python bench/cascade.py ... --minutes 4 --variants v x v_shift2   # the SR variants to train

The base model (a cpu_tiny demo model) draws the held-out demo prompts at its base resolution once; each
upscaler brings the same images to ×4 (128 px at cpu_tiny):

* ``bicubic``;
* ``enhancer``: the feed-forward QualityEnhancer, trained here on ×2/×4 (degraded → original) pairs;
* ``sr_<variant>``: the super-resolution diffusion stage, trained here on random crops: ``v`` (v-prediction),
  ``x`` (x-prediction), ``v_shift2`` (v-prediction on a schedule with every SNR divided by 4);
* ``sr_model``: the stage the model file was trained with (in its own run, not at equal time), if any.

Every trained upscaler gets the same wall time, in ``--rounds`` interleaved slices so that a change in the
machine's load touches all of them alike; they train on the folder minus ``--n_real`` held-out real images.

Measured on the generated images: the demo attributes at the output size (``moas.eval.attributes``), edge
sharpness (mean Sobel magnitude) relative to real images at the same size, and KID against the held-out
real images in the folder tag model's features (``moas.eval.tagger``; its input is 64 px, so KID sees the
output downsized 2×). On the held-out real images, downsized 4× and brought back up: PSNR against the
original and the same sharpness ratio. A picture grid is written with ``--grid``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from moas.config_sections import EnhanceConfig, LossConfig, MonitorConfig  # noqa: E402
from moas.data.dataset import ArtDataset, to_model_range  # noqa: E402
from moas.data.synthetic import eval_cases  # noqa: E402
from moas.diffusion.sr_condition import downsample  # noqa: E402
from moas.eval.attributes import ATTRIBUTES, measure_attributes  # noqa: E402
from moas.eval.kid import kid  # noqa: E402
from moas.eval.tagger import load_or_train_tagger, resize_images  # noqa: E402
from moas.inference.pipeline import Pipeline  # noqa: E402
from moas.inference.sr_upscale import DiffusionUpscaler, saved_sr_config  # noqa: E402
from moas.inference.upscale import cascade  # noqa: E402
from moas.text.bank import TextBank  # noqa: E402
from moas.train.side_batches import hr_dataset  # noqa: E402
from moas.train.side_networks import SideNetworks  # noqa: E402
from moas.train.sr_stage import SRStageTraining  # noqa: E402

VARIANTS = {
    "v": {"prediction_type": "v_prediction"},
    "x": {"prediction_type": "sample"},
    "v_shift2": {"prediction_type": "v_prediction", "noise_shift": 2.0},
    "x_shift2": {"prediction_type": "sample", "noise_shift": 2.0},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/best_model.safetensors", help="the base model file")
    p.add_argument("--data_dir", default="data/demo", help="the demo folder the model trained on")
    p.add_argument("--minutes", type=float, default=4.0, help="training wall time of each upscaler")
    p.add_argument("--rounds", type=int, default=4, help="interleaved slices of that time")
    p.add_argument("--variants", nargs="+", default=["v", "x", "v_shift2"], choices=sorted(VARIANTS))
    p.add_argument("--n", type=int, default=32, help="held-out prompts drawn and upscaled")
    p.add_argument("--n_real", type=int, default=48, help="real images held out of the upscalers' training")
    p.add_argument("--sr_steps", type=int, default=12, help="sampling steps of the diffusion stages")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/cascade.json")
    p.add_argument("--grid", default="docs/images/cascade_grid.png")
    return p.parse_args(argv)


# --- data and upscalers -------------------------------------------------------------------------------


def split_real(dataset: ArtDataset, n_real: int, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of the folder, by a seeded permutation."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_real:]), sorted(order[:n_real])


def subset(dataset: ArtDataset, indices: list[int]) -> ArtDataset:
    """The images ``indices`` of the validated folder, as a validated dataset of their own."""
    return hr_dataset(dataset, dataset.resolution, indices=indices)


def build_trainers(args, pipe: Pipeline, hr_train: ArtDataset, base_train: ArtDataset) -> dict:
    """name -> (step function, the module that upscales after training)."""
    sr_cfg = replace(saved_sr_config(pipe.model_config.get("sr")), train=True)
    bank = TextBank(pipe.encoder, [], progress=False)
    trainers = {}
    for name in args.variants:
        stage = SRStageTraining(
            replace(sr_cfg, **VARIANTS[name]), hr_train, bank, torch.device("cpu"), args.seed
        )
        trainers[f"sr_{name}"] = (stage.step, stage)
    saved = pipe.model_config.get("enhance") or {}
    ec = EnhanceConfig(**{k: v for k, v in saved.items() if k in EnhanceConfig.__dataclass_fields__})
    ec = replace(ec, train=True, scale=sr_cfg.scale)
    domain = SideNetworks(
        LossConfig(domain=False, adversarial=False),
        ec,
        base_train,
        torch.device("cpu"),
        generator_lr=ec.lr,
        weight_decay=0.0,
        term_clamp=10.0,
        max_grad_norm=1.0,
        seed=args.seed,
    )
    trainers["enhancer"] = (domain.enhancer_step, domain)
    return trainers


def train_equal_time(trainers: dict, minutes: float, rounds: int) -> dict:
    """Each trainer gets ``minutes`` of wall time in ``rounds`` interleaved slices; {name: steps, seconds}."""
    spent = {name: {"steps": 0, "seconds": 0.0} for name in trainers}
    slice_s = minutes * 60 / rounds
    for r in range(rounds):
        for name, (step, _) in trainers.items():
            start = time.perf_counter()
            while time.perf_counter() - start < slice_s:
                step()
                spent[name]["steps"] += 1
            spent[name]["seconds"] += time.perf_counter() - start
            print(f"round {r + 1}/{rounds} {name}: {spent[name]['steps']} steps", flush=True)
    return spent


def upscalers(trainers: dict, pipe: Pipeline, args) -> dict:
    """name -> function(uint8 base images, captions, seeds) -> uint8 images ×scale."""
    sr_cfg = saved_sr_config(pipe.model_config.get("sr"))
    side_of = lambda x: (x.shape[-1] * sr_cfg.scale, x.shape[-2] * sr_cfg.scale)  # noqa: E731

    def diffusion(up: DiffusionUpscaler):
        return lambda x, caps, seeds: up(x, pipe.encode(caps), seeds, steps=args.sr_steps)

    out = {"bicubic": lambda x, caps, seeds: cascade(x, None, *side_of(x), "none")}
    enhancer = trainers["enhancer"][1].enhancer.eval()
    out["enhancer"] = lambda x, caps, seeds: cascade(x, enhancer, *side_of(x), "full")
    for name, (_, stage) in trainers.items():
        if name.startswith("sr_"):
            out[name] = diffusion(DiffusionUpscaler(stage.ema.model, stage.cfg, torch.device("cpu")))
    if pipe.sr is not None:
        out["sr_model"] = diffusion(pipe.sr)
    return out


# --- measurements ------------------------------------------------------------------------------------


def sharpness(images: torch.Tensor) -> float:
    """Mean Sobel gradient magnitude of the luminance of uint8 (B, 3, H, W) images (per unit intensity)."""
    y = (images.float() / 255.0 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    gx, gy = F.conv2d(y, kx), F.conv2d(y, kx.transpose(-1, -2))
    return float((gx.square() + gy.square()).sqrt().mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).square().mean((1, 2, 3)).clamp(min=1e-10)  # (B,)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


def attribute_scores(images: torch.Tensor, cases: list[dict]) -> dict:
    found = [measure_attributes(im.permute(1, 2, 0).numpy()) for im in images]
    row = {a: float(np.mean([f[a] == c[a] for f, c in zip(found, cases, strict=True)])) for a in ATTRIBUTES}
    row["mean"] = float(np.mean([row[a] for a in ATTRIBUTES]))
    return row


def measure(images: torch.Tensor, cases, real: torch.Tensor, tagger, real_feats) -> dict:
    feats = tagger.features(resize_images(images, 64))
    k_mean, k_std = kid(feats, real_feats)
    return {
        "attributes": attribute_scores(images, cases),
        "sharpness_ratio": sharpness(images) / sharpness(real),
        "kid": k_mean,
        "kid_std": k_std,
    }


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pipe = Pipeline.from_file(args.model, torch.device("cpu"))
    root = Path(args.data_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    base_res = pipe.resolution
    scale = saved_sr_config(pipe.model_config.get("sr")).scale
    ds = ArtDataset(root / "train", base_res, root / "cache" / "bench")
    ds.validate(progress=False)
    train_idx, real_idx = split_real(ds, args.n_real, args.seed)
    base_train = subset(ds, train_idx)
    hr_train = hr_dataset(base_train, base_res * scale)
    hr_real = hr_dataset(subset(ds, real_idx), base_res * scale)
    real = torch.stack([hr_real[i]["pixels"] for i in range(len(hr_real))])  # (n_real, 3, S, S) uint8
    real_caps = [hr_real[i]["caption"] for i in range(len(hr_real))]
    ds64 = ArtDataset(root / "train", 64, root / "cache" / "bench64")
    ds64.validate(progress=False)
    # The settings training uses, so the folder's cached tag model (from the run) is the one measured with.
    tagger = load_or_train_tagger(ds64, seed=0, progress=False, max_steps=MonitorConfig().tagger_steps)
    real_feats = tagger.features(resize_images(real, 64))

    for i in range(len(hr_train)):  # build the cache entries now, not inside the first trainer's time
        hr_train[i]
    trainers = build_trainers(args, pipe, hr_train, base_train)
    spent = train_equal_time(trainers, args.minutes, args.rounds)

    cases = [c for c in eval_cases(manifest, args.n, args.seed) if c["split"] == "held_out"][: args.n]
    prompts, seeds = [c["prompt"] for c in cases], [c["seed"] for c in cases]
    base = pipe(prompts, seeds=seeds)  # (n, 3, b, b) uint8
    low_real = ((downsample(to_model_range(real), scale) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    results = {"base_nearest": measure(nearest(base, scale), cases, real, tagger, real_feats)}
    pictures = {"base (nearest)": (nearest(base, scale), nearest(low_real, scale))}
    for name, fn in upscalers(trainers, pipe, args).items():
        start = time.perf_counter()
        out = fn(base, prompts, seeds)
        per_image = (time.perf_counter() - start) / len(base)
        rec = fn(low_real, real_caps, list(range(len(low_real))))
        results[name] = measure(out, cases, real, tagger, real_feats) | {
            "seconds_per_image": per_image,
            "real_psnr": psnr(rec, real),
            "real_sharpness_ratio": sharpness(rec) / sharpness(real),
            "train": spent.get(name),
        }
        pictures[name] = (out, rec)
        print(name, json.dumps(results[name]), flush=True)
    if args.grid:
        write_grid(Path(args.grid), pictures, real)
    return {"results": results, "settings": vars(args), "machine": machine(), "n_cases": len(cases)}


def nearest(images: torch.Tensor, scale: int) -> torch.Tensor:
    return images.repeat_interleave(scale, -1).repeat_interleave(scale, -2)


def write_grid(path: Path, pictures: dict, real: torch.Tensor, generated: int = 3, rebuilt: int = 2) -> None:
    """One column per upscaler. The first ``generated`` rows: held-out prompts drawn by the base model and
    brought up (no reference exists); the last ``rebuilt`` rows: real held-out images downsized and brought
    back up, with the original in the last column."""
    names = list(pictures)
    side, label_h = real.shape[-1], 14
    rows = generated + rebuilt
    grid = Image.new("RGB", ((len(names) + 1) * side, rows * side + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate([*names, "real"]):
        draw.text((c * side + 2, 1), name, fill="black")
        for r in range(rows):
            if c == len(names):
                src = real[r - generated] if r >= generated else None
            else:
                out, rec = pictures[name]
                src = out[r] if r < generated else rec[r - generated]
            if src is not None:
                grid.paste(Image.fromarray(src.permute(1, 2, 0).numpy()), (c * side, label_h + r * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def machine() -> dict:
    import psutil

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(logical=True),
        "load_1min": os.getloadavg()[0],
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report["results"]))
    return 0


def table(results: dict) -> str:
    head = f"{'upscaler':<14}{'attr mean':>10}{'hair':>7}{'eyes':>7}{'bg':>7}{'sharp':>7}{'KID':>9}"
    head += f"{'real PSNR':>11}{'real sharp':>11}{'s/img':>8}{'steps':>7}"
    lines = [head]
    for name, r in results.items():
        a = r["attributes"]
        lines.append(
            f"{name:<14}{a['mean']:>10.3f}{a['hair_color']:>7.3f}{a['eye_color']:>7.3f}{a['background']:>7.3f}"
            f"{r['sharpness_ratio']:>7.2f}{r['kid']:>9.3g}"
            + (
                f"{r['real_psnr']:>11.2f}{r['real_sharpness_ratio']:>11.2f}{r['seconds_per_image']:>8.2f}"
                if "real_psnr" in r
                else " " * 30
            )
            + (f"{r['train']['steps']:>7d}" if r.get("train") else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
