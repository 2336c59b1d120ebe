"""moas's trainer against a plain diffusers-example-style loop on the same U-Net, and the model FLOP
utilisation of both against this machine's measured matmul peak.

    python bench/peer.py                  # writes bench/peer.json
    python bench/peer.py --steps 20 --rounds 2

Both train the ``cpu_tiny`` network with text conditioning (``--conditioning text``; the enhancer and the
super-resolution stage off, as they are other networks) on the demo data at the same batch, the same
threads and the same settings: AMSGrad AdamW (fused where torch has it), gradient clipping at
``train.max_grad_norm``, Min-SNR-weighted v-prediction loss, bf16 autocast where the profile uses it, an EMA.

* **moas**: ``moas.train.loop.train`` as ``moas train`` runs it — its DataLoader, the text bank, the
  diffusion objective, the lr schedule, the NaN/Inf guard, the thread governor, the resource readings and
  its TensorBoard logging every step. Timed from the end of step ``--skip`` (past the first epoch, whose
  cache entries are read from disk; the peer's images are in memory from the start) to the last step; no
  checkpoint, validation or sample grid falls inside.
* **peer**: what the diffusers text-to-image example does per step (with ``--snr_gamma``, ``--use_ema`` and
  its default clipping), with everything precomputed: images and the text encoder's outputs in memory,
  ``DDPMScheduler.add_noise``, ``get_velocity``, the weighted MSE, the optimizer and the EMA update. It
  trains the same network as moas — ``MoasGenerator`` with text conditioning — so the ratio measures the
  trainer, not two networks (``--peer_network unet`` keeps an older arm: the U-Net on a linear projection
  of the tokens, ~25 % cheaper per step).

Rounds alternate (moas, peer, moas, peer…) in one process, so a change of machine load hits both. A round's
speed is its batch over its median step time (robust to the few steps a VM's neighbours slow down); the
ratio is the median of moas's rounds over the median of the peer's. ``--profile`` adds each round's
per-step profile (``bench/step_profile.py``): milliseconds per part of the step, and the share of the step
beyond the model's own work. MFU: FLOPs of one training step (``torch.utils.flop_counter``) × steps/s ÷ the
peak of a 4096² fp32 matmul measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

from moas.config import load_config  # noqa: E402
from moas.data.dataset import to_model_range  # noqa: E402
from moas.data.synthetic import generate_demo_dataset  # noqa: E402
from moas.device import (
    autocast_dtype,  # noqa: E402
    cpu_name,  # noqa: E402
)
from moas.diffusion.schedule import make_train_scheduler  # noqa: E402
from moas.models.generator import MoasGenerator  # noqa: E402
from moas.text.encoder import TextEncoder  # noqa: E402
from moas.text.inputs import caption_inputs  # noqa: E402
from moas.train.builders import generator_args  # noqa: E402
from moas.train.data_setup import build_dataset  # noqa: E402
from moas.train.loop import train  # noqa: E402
from moas.train.trained_net import adamw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_profile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def matmul_peak(threads: int, n: int = 4096, reps: int = 5) -> float:
    """FLOP/s of a dense fp32 n×n matmul, the best of ``reps``."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def bench_config(data_dir: Path, work: Path, steps: int):
    overrides = {
        "data": {"data_dir": str(data_dir)},
        "brain": {"conditioning": "text"},
        "enhance": {"train": False},
        "sr": {"train": False},
        "train": {
            "epochs": 1000,
            "max_steps": steps,
            "save_every": 1000,
            "sample_every": 0,
            "checkpoint_dir": str(work / "ckpt"),
            "save_path": str(work / "models" / "m.safetensors"),
            "run_dir": str(work / "runs"),
            "log_dir": str(work / "logs"),
        },
        "monitor": {"val_fraction": 0.0, "select_best": False},
    }
    return load_config("cpu_tiny", None, overrides, use_env=False)


def moas_round(data_dir: Path, steps: int, skip: int, profile: list | None = None, between=None) -> float:
    """Images/s of ``steps`` optimizer steps of moas's trainer (the first ``skip`` are warm-up), timed from
    the end of step ``skip`` to the end of the last step; with ``profile`` (a list), the per-step profile of
    those steps is appended to it; ``between`` is called after each timed step, outside its timing."""
    probes = step_profile.moas_probes() if between is None else step_profile.Probes()
    window = step_profile.StepWindow(probes, skip, steps)
    window.between = between
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = bench_config(data_dir, Path(tmp), steps)
            train(cfg, progress=False, dashboard=False)
    finally:
        probes.restore()
    result = window.result()
    if profile is not None:
        profile.append(result)
    return cfg.train.batch_size * 1000 / result["median_step_ms"]


def interleaved(peer: Peer, data_dir: Path, a: argparse.Namespace, threads: int) -> dict:
    """moas's and the peer's steps alternated one by one (a peer step after each moas step, outside moas's
    timing), ``a.interleave`` runs: a VM whose speed drifts over minutes slows both sides alike."""
    peer_ms: list[float] = []

    def one_peer_step() -> None:
        torch.set_num_threads(threads)
        t = time.perf_counter()
        peer.step()
        peer_ms.append(1000 * (time.perf_counter() - t))

    moas_ms: list[float] = []
    for _ in range(a.interleave):
        prof: list = []
        moas_round(data_dir, a.steps, a.skip, prof, between=one_peer_step)
        moas_ms.append(prof[-1]["median_step_ms"])
    m, p = statistics.median(moas_ms), statistics.median(peer_ms)
    print(f"interleaved step by step: moas {m:.1f} ms, peer {p:.1f} ms per step", flush=True)
    return {
        "moas_median_step_ms_per_run": [round(v, 2) for v in moas_ms],
        "peer_median_step_ms": round(p, 2),
        "peer_steps": len(peer_ms),
        "ratio_moas_over_peer": round(p / m, 3),
    }


class Peer:
    """The diffusers example's training step on precomputed images and token embeddings."""

    def __init__(self, cfg, data_dir: Path, network: str = "same") -> None:
        self.cfg = cfg
        dataset = build_dataset(cfg, str(data_dir), progress=False)
        self.images = torch.stack([to_model_range(dataset[i]["pixels"]) for i in range(len(dataset))])
        enc = TextEncoder(cfg.text.model_name, max_tokens=cfg.text.max_tokens)
        self.text = caption_inputs(
            enc, dataset.captions(), "cpu"
        )  # (N, L, 768) tokens, (N, G, 768) tags, masks
        self.tokens, self.mask = self.text["tokens"], self.text["mask"]
        self.network = network
        self.generator = MoasGenerator(**generator_args(cfg))
        ref = self.generator.unet
        self.patch = ref.patch_size
        if network == "same":
            params = list(self.generator.parameters())
        else:
            self.unet = UNet2DConditionModel.from_config(ref.unet.config)
            self.proj = torch.nn.Linear(self.tokens.shape[-1], self.unet.config.cross_attention_dim)
            params = list(self.unet.parameters()) + list(self.proj.parameters())
        tc = cfg.train
        # moas's optimizer settings (AMSGrad AdamW, fused where torch has it) and clipping, so the ratio
        # measures the trainer, not two optimizers.
        self.opt = adamw(
            params, lr=tc.lr, betas=(0.9, 0.999), weight_decay=tc.weight_decay, amsgrad=tc.amsgrad
        )
        self.max_grad_norm = tc.max_grad_norm
        amp = autocast_dtype(torch.device("cpu"), tc.mixed_precision)
        self.autocast = (lambda: torch.autocast("cpu", dtype=amp)) if amp is not None else nullcontext
        self.ema = [p.detach().clone() for p in params]
        self.params = params
        self.sched = DDPMScheduler.from_config(make_train_scheduler(cfg.diffusion).config)
        self.batch = cfg.train.batch_size
        self.gen = torch.Generator().manual_seed(0)

    def snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The diffusers example's ``--snr_gamma`` weights for v-prediction: min(SNR, γ) / (SNR + 1)."""
        a = self.sched.alphas_cumprod[t]
        snr = a / (1 - a)
        return snr.clamp(max=self.cfg.diffusion.min_snr_gamma) / (snr + 1)

    def forward_loss(self, idx: torch.Tensor) -> torch.Tensor:
        x0 = self.images[idx]
        if self.network == "same":
            noise = torch.randn(x0.shape, generator=self.gen)
            t = torch.randint(0, self.sched.config.num_train_timesteps, (len(idx),), generator=self.gen)
            noisy = self.sched.add_noise(x0, noise, t)
            with self.autocast():
                pred = self.generator(noisy, t, {k: v[idx] for k, v in self.text.items()}).pred
            target = self.sched.get_velocity(x0, noise, t)
            per_sample = torch.nn.functional.mse_loss(pred.float(), target, reduction="none").mean((1, 2, 3))
            return (per_sample * self.snr_weight(t)).mean()
        if self.patch > 1:
            x0 = torch.nn.functional.pixel_unshuffle(x0, self.patch)
        noise = torch.randn(x0.shape, generator=self.gen)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (len(idx),), generator=self.gen)
        noisy = self.sched.add_noise(x0, noise, t)
        ctx = self.proj(self.tokens[idx])
        pooled = (ctx * self.mask[idx, :, None]).sum(1) / self.mask[idx].sum(1, keepdim=True).clamp(min=1)
        pred = self.unet(noisy, t, ctx, class_labels=pooled, encoder_attention_mask=self.mask[idx]).sample
        return torch.nn.functional.mse_loss(pred, self.sched.get_velocity(x0, noise, t))

    def step(self) -> None:
        idx = torch.randint(0, len(self.images), (self.batch,), generator=self.gen)
        loss = self.forward_loss(idx)
        self.backward(loss)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.update()
        self.opt.zero_grad(set_to_none=True)
        self.ema_update()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def update(self) -> None:
        self.opt.step()

    @torch.no_grad()
    def ema_update(self) -> None:
        torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - self.cfg.train.ema_decay)

    def images_per_sec(self, steps: int, skip: int, profile: list | None = None) -> float:
        """Images/s over ``steps - skip`` steps after ``skip`` warm-up steps; the per-step profile appended to
        ``profile`` when given."""
        for _ in range(skip):
            self.step()
        probes = self.probes()
        t = time.perf_counter()
        probes.clock.started = t
        durations = []
        try:
            for _ in range(steps - skip):
                t0 = time.perf_counter()
                self.step()
                durations.append(time.perf_counter() - t0)
            wall = time.perf_counter() - t
        finally:
            probes.restore()
        result = step_profile.per_step_ms(probes.clock.seconds, wall, steps - skip, durations)
        if profile is not None:
            profile.append(result)
        return self.batch * 1000 / result["median_step_ms"]

    def probes(self) -> step_profile.Probes:
        """The same parts as moas's profile, where the peer has them."""
        p = step_profile.Probes()
        p.wrap(MoasGenerator, "forward", "forward")
        p.wrap(self, "forward_loss", "loss")
        p.wrap(self, "backward", "backward")
        p.wrap(torch.nn.utils, "clip_grad_norm_", "gradient clipping")
        p.wrap(self, "update", "optimizer update")
        p.wrap(torch.optim.Optimizer, "zero_grad", "zero_grad")
        p.wrap(self, "ema_update", "EMA")
        return p

    def step_flops(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        idx = torch.arange(self.batch) % len(self.images)
        with FlopCounterMode(display=False) as fc:
            self.forward_loss(idx).backward()
        self.opt.zero_grad(set_to_none=True)
        return fc.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per round")
    ap.add_argument(
        "--skip",
        type=int,
        default=16,
        help="steps not timed: the first epoch (RAM cache filling) and warm-up",
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n_images", type=int, default=200, help="demo images drawn (~12 steps per epoch)")
    ap.add_argument(
        "--peer_network",
        choices=("same", "unet"),
        default="same",
        help="same: the peer trains moas's network; unet: the U-Net on a linear projection of the tokens",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "peer.json"))
    ap.add_argument("--profile", action="store_true", help="also write each side's per-step profile")
    ap.add_argument(
        "--interleave", type=int, default=0, help="also N runs alternating moas and peer step by step"
    )
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "demo"
        generate_demo_dataset(data, n_images=a.n_images, size=32, seed=0, progress=False)
        cfg = bench_config(data / "train", Path(tmp), a.steps)
        torch.set_num_threads(cfg.resources.cpu_threads)
        threads = torch.get_num_threads()
        peer = Peer(cfg, data / "train", a.peer_network)
        moas_ips, peer_ips = [], []
        moas_prof: list | None = [] if a.profile else None
        peer_prof: list | None = [] if a.profile else None
        for r in range(a.rounds):
            moas_ips.append(moas_round(data / "train", a.steps, a.skip, moas_prof))
            torch.set_num_threads(threads)
            peer_ips.append(peer.images_per_sec(a.steps, a.skip, peer_prof))
            print(f"round {r + 1}: moas {moas_ips[-1]:.2f} img/s, peer {peer_ips[-1]:.2f} img/s", flush=True)
        stepwise = interleaved(peer, data / "train", a, threads) if a.interleave else None
        flops = peer.step_flops()
    peak = matmul_peak(threads)
    m, p = statistics.median(moas_ips), statistics.median(peer_ips)
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {threads} threads",
        "batch": cfg.train.batch_size,
        "resolution": cfg.data.resolution,
        "peer_network": a.peer_network,
        "moas_images_per_sec": [round(v, 3) for v in moas_ips],
        "peer_images_per_sec": [round(v, 3) for v in peer_ips],
        "ratio_moas_over_peer": round(m / p, 3),
        "step_gflop": round(flops / 1e9, 2),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "mfu_moas": round(flops * m / cfg.train.batch_size / peak, 4),
        "mfu_peer": round(flops * p / cfg.train.batch_size / peak, 4),
    }
    if stepwise is not None:
        result["interleaved"] = stepwise
    if a.profile:
        result["profile_moas"], result["profile_peer"] = moas_prof, peer_prof
    print(json.dumps(result, indent=2))
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
