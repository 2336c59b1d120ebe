"""The real job on one CUDA GPU, in about five minutes: does the rtx3060_12gb profile fit a 12 GB card, where
a step's time goes, what a large card would do, does out-of-memory recovery work, how long a 512-px image takes.

    python bench/gpu.py                          # every phase on a CUDA GPU
    python bench/gpu.py --phases env,cap12       # some of them
    python bench/gpu.py --smoke                  # the same logic on the CPU with the tiny test model (tests)

The results go to ``--out`` (default ``$OUT/gpu.json`` when ``OUT`` is set, else ``bench/gpu.json``), written
again after every phase, so a run cut short keeps what it measured. Each phase runs in its own try/except:
a failing phase records its error and the next one runs. Training phases run on synthetic 128-px demo data
for ``--steps`` optimizer steps and skip the regular checkpoints (the squeeze keeps its emergency one).

* **env**: torch, CUDA, the card (name, capability, memory, native bf16), the profile the machine would get,
  and the memory plans of the profile for a 12 GB card and for the whole card.
* **cap12**: the plan applied under ``torch.cuda.set_per_process_memory_fraction`` (12 GB), bf16: peak
  allocated and reserved memory against the plan's prediction, images/s.
* **step**: the same run timed by part with CUDA synchronised around each: data wait, generator forward +
  backward, optimizer (clip, AdamW, scaler), EMA, enhancer, super-resolution stage — seconds per step.
* **large**: the whole card, no cap: its plan, and bf16 training with ``channels_last`` off and on.
* **squeeze**: after a few steps the cap drops to ``--squeeze_gb``, so the next step runs out of memory;
  passes when training went on at a smaller micro-batch with the same effective batch; recovery time.
* **generate**: the cap12 run's model through ``moas generate``'s code at the cascade's size (512 px):
  latency, peak memory, and that the image is not flat.

``--smoke`` runs every phase on the CPU with ``tests/tiny.toml`` (no memory cap: the squeeze is an injected
out-of-memory error, ``MOAS_INJECT=oom@N``; the large card is a mocked 80 GB). A number from ``--smoke`` is
not a GPU number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from moas.config import load_config  # noqa: E402
from moas.data.synthetic import generate_demo_dataset  # noqa: E402
from moas.io import atomic_write_bytes  # noqa: E402
from moas.monitor.logs import setup_logging  # noqa: E402
from moas.train.loop import build_trainer  # noqa: E402
from moas.train.memory_plan import GB  # noqa: E402
from moas.train.plans import apply_memory_plan, memory_plan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("env", "cap12", "step", "large", "squeeze", "generate")
MOCK_CARD_GB = 80.0  # the large card of --smoke


def gpu() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if gpu():
        torch.cuda.synchronize()


def card_gb(a) -> float:
    return torch.cuda.get_device_properties(0).total_memory / GB if not a.smoke else MOCK_CARD_GB


def cap(gb: float | None) -> None:
    if gb is None or not gpu():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gb * GB / total), 0)


def run_config(a, root: Path, plan_gb: float | None, **train):
    """The profile (or the tiny test config) on the bench data, with the memory plan for ``plan_gb``."""
    base = (None, ROOT / "tests" / "tiny.toml") if a.smoke else ("rtx3060_12gb", None)
    over = {
        "data": {"data_dir": str(a.data), "cache_dir": str(a.cache), "num_workers": 0 if a.smoke else 2},
        "train": {
            "checkpoint_dir": str(root / "ckpt"),
            "run_dir": str(root / "runs"),
            "log_dir": str(root / "logs"),
            "save_path": str(root / "models" / "model.safetensors"),
            "max_steps": a.steps,
            "sample_every": 0,
            "save_every": 10**6,
            "epochs": 1000,
            **train,
        },
        "monitor": {"val_fraction": 0.0, "select_best": False},
        "resources": {"device": "cpu" if a.smoke else "cuda"},
    }
    cfg = load_config(*base, over, use_env=False)
    return cfg if plan_gb is None else apply_memory_plan(cfg, memory_plan(cfg, plan_gb))


class PartTimer:
    """Seconds per labelled part of a run, CUDA synchronised around each call (this phase only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, obj, name: str, label: str) -> None:
        real = getattr(obj, name)

        def timed(*args, **kwargs):
            sync()
            t = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                sync()
                self.seconds[label] += time.perf_counter() - t

        setattr(obj, name, timed)

    def loader(self, trainer) -> None:
        """Time the wait for each batch of the run's DataLoader."""
        real, timer = trainer._loader, self

        class Timed:
            def __init__(self, loader) -> None:
                self.loader = loader

            def __len__(self) -> int:
                return len(self.loader)

            def __iter__(self):
                it = iter(self.loader)
                while True:
                    t = time.perf_counter()
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                    timer.seconds["data wait"] += time.perf_counter() - t
                    yield batch

        trainer._loader = lambda: Timed(real())


def no_regular_checkpoints(trainer) -> None:
    """The phases measure steps, not multi-GB writes: only emergency checkpoints are written."""
    real = trainer.save
    trainer.save = lambda name, kind="checkpoint": real(name, kind) if kind.startswith("emergency") else None


def train(
    a, root: Path, plan_gb: float | None, cap_gb: float | None, parts: bool = False, **train_kw
) -> dict:
    cfg = run_config(a, root, plan_gb, **train_kw)
    cap(cap_gb)
    if gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = build_trainer(cfg, progress=False, dashboard=False)
    no_regular_checkpoints(t)
    timer = PartTimer()
    if parts:
        timer.loader(t)
        timer.wrap(t, "_protected_micro_step", "generator forward + backward")
        timer.wrap(t, "_optimizer_step", "optimizer + EMA")
        timer.wrap(t.parts.ema, "update", "EMA")
        timer.wrap(t.parts.side, "after_step", "enhancer and discriminator")
        if t.parts.sr is not None:
            timer.wrap(t.parts.sr, "step", "super-resolution stage")
    start = (t.state.micro_batch, t.state.grad_accum)
    t0 = time.perf_counter()
    r = t.run()
    out = {
        "seconds": round(time.perf_counter() - t0, 1),
        "steps": r.global_step,
        "images_per_sec": round(r.images_per_sec, 3),
        "micro_batch_x_accum": [start, [r.micro_batch, r.grad_accum]],
        "model": str(r.model_path),
    }
    if gpu():
        out["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
        out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 2)
    if parts:
        s = dict(timer.seconds)
        s["optimizer (clip, AdamW, scaler)"] = s.pop("optimizer + EMA", 0.0) - s.get("EMA", 0.0)
        out["seconds_per_step"] = {k: round(v / max(r.global_step, 1), 4) for k, v in s.items()}
    return out


def phase_env(a) -> dict:
    from moas.device import detect_profile

    choice = detect_profile()
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "profile": choice.notice()}
    if gpu():
        p = torch.cuda.get_device_properties(0)
        out |= {
            "device": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gb": round(p.total_memory / GB, 2),
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
        }
    cfg = run_config(a, a.tmp / "env", None)
    out["plan_12gb"] = memory_plan(cfg, 12.0).describe()
    out["plan_card"] = memory_plan(cfg, card_gb(a)).describe()
    out["budgets"] = load_config(choice.profile, use_env=False).resources.describe()
    return out


def phase_cap12(a) -> dict:
    amp = {} if a.smoke else {"mixed_precision": "bf16"}
    plan = None if a.smoke else memory_plan(run_config(a, a.tmp / "p", None), a.cap_gb)
    out = train(a, a.tmp / "cap12", None if a.smoke else a.cap_gb, a.cap_gb, **amp)
    if plan is not None:
        out["plan_peak_gb"] = round(plan.peak / GB, 2)
        out["fits"] = out["peak_reserved_gb"] <= a.cap_gb
    a.model = out["model"]
    return out


def phase_step(a) -> dict:
    amp = {} if a.smoke else {"mixed_precision": "bf16"}
    return train(a, a.tmp / "step", None if a.smoke else a.cap_gb, a.cap_gb, parts=True, **amp)


def phase_large(a) -> dict:
    amp = {} if a.smoke else {"mixed_precision": "bf16"}
    card = card_gb(a)
    out = {"card_gb": round(card, 1), "plan": memory_plan(run_config(a, a.tmp / "lp", None), card).describe()}
    plan_gb = None if a.smoke else card
    for cl in (False, True):
        out[f"channels_last_{str(cl).lower()}"] = train(
            a, a.tmp / f"large_{cl}", plan_gb, None, channels_last=cl, **amp
        )
    return out


def phase_squeeze(a) -> dict:
    amp = {} if a.smoke else {"mixed_precision": "bf16"}
    at = 2 if a.smoke else 3
    root = a.tmp / "squeeze"
    cfg = run_config(a, root, None if a.smoke else a.cap_gb, **amp)
    cap(a.cap_gb)
    if a.smoke:
        os.environ["MOAS_INJECT"] = f"oom@{at}"
    t = build_trainer(cfg, progress=False, dashboard=False)
    os.environ.pop("MOAS_INJECT", None)
    no_regular_checkpoints(t)
    timer = PartTimer()
    timer.wrap(t, "_recover_from_oom", "recovery")
    if not a.smoke:
        real = t._at_boundary

        def squeeze() -> bool:
            stop = real()
            if t.state.global_step == at:
                torch.cuda.empty_cache()
                cap(a.squeeze_gb)
            return stop

        t._at_boundary = squeeze
    start = (t.state.micro_batch, t.state.grad_accum)
    r = t.run()
    emergencies = sorted((root / "ckpt").glob("emergency_oom*.pt"))
    return {
        "steps": r.global_step,
        "micro_batch_x_accum": [start, [r.micro_batch, r.grad_accum]],
        "emergency_checkpoints": [p.name for p in emergencies],
        "recovery_seconds": round(timer.seconds["recovery"], 2),
        "passed": bool(emergencies)
        and r.micro_batch < start[0]
        and r.micro_batch * r.grad_accum == start[0] * start[1]
        and r.global_step == a.steps,
    }


def phase_generate(a) -> dict:
    from moas.device import resolve_device
    from moas.inference.generate import GenerateRequest, generate
    from moas.inference.pipeline import Pipeline

    model = getattr(a, "model", None) or train(a, a.tmp / "gen_model", None, a.cap_gb)["model"]
    pipe = Pipeline.from_file(model, resolve_device("cpu" if a.smoke else "cuda"))
    side = pipe.resolution * (pipe.sr.scale if pipe.sr is not None else 4)
    req = GenerateRequest(prompt="1girl, red hair, blue eyes, forest", width=side, height=side)
    req.steps, req.guidance_scale, req.sampler = pipe.settings()
    generate(pipe, req, a.tmp / "warm.png", "bench", progress=False)
    if gpu():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    generate(pipe, req, a.tmp / "result.png", "bench", progress=False)
    out = {"seconds_per_image": round(time.perf_counter() - t, 2), "size": side, "steps": req.steps}
    pixels = np.asarray(Image.open(a.tmp / "result.png").convert("RGB"), dtype=np.float32)
    out["pixel_std"] = round(float(pixels.std()), 2)
    out["not_flat"] = out["pixel_std"] > 2.0
    if gpu():
        out["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
    return out


def default_out() -> str:
    out = os.environ.get("OUT")
    return str(Path(out) / "gpu.json") if out else str(ROOT / "bench" / "gpu.json")


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="run the logic on the CPU with the tiny test model")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of: {', '.join(PHASES)}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training phase (6; smoke: 3)")
    p.add_argument("--cap_gb", type=float, default=12.0, help="the card to imitate")
    p.add_argument("--squeeze_gb", type=float, default=8.0, help="the cap after the squeeze")
    p.add_argument("--out", default=default_out(), help="the JSON file (default: $OUT/gpu.json, else bench/)")
    a = p.parse_args(argv)
    a.phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    unknown = sorted(set(a.phases) - set(PHASES))
    if unknown:
        p.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    a.steps = a.steps or (3 if a.smoke else 6)
    if a.smoke:
        a.cap_gb = None
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if not a.smoke and not gpu():
        print("bench/gpu.py needs a CUDA GPU (use --smoke to check its logic on the CPU).", file=sys.stderr)
        return 2
    setup_logging(None)
    res: dict = {"smoke": a.smoke, "device": torch.cuda.get_device_name() if gpu() and not a.smoke else "cpu"}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        a.tmp = Path(tmp)
        n, size = (16, 32) if a.smoke else (64, 128)
        generate_demo_dataset(a.tmp / "demo", n_images=n, size=size, seed=0, progress=False)
        a.data, a.cache = a.tmp / "demo" / "train", a.tmp / "cache"
        for name in a.phases:
            t = time.perf_counter()
            try:
                res[name] = globals()[f"phase_{name}"](a)
            except Exception as e:  # noqa: BLE001 - a phase's failure is a result; the next phase runs
                res[name] = {
                    "error": f"{type(e).__name__}: {str(e)[:300]}",
                    "trace": traceback.format_exc()[-1500:],
                }
            res[name]["phase_seconds"] = round(time.perf_counter() - t, 1)
            atomic_write_bytes(out, (json.dumps(res, indent=2) + "\n").encode())
            print(f"{name}: {res[name]['phase_seconds']} s", file=sys.stderr)
    print(json.dumps(res, indent=2))
    failed = [k for k in a.phases if "error" in res[k]] + (
        ["squeeze"] if "squeeze" in a.phases and not res["squeeze"].get("passed") else []
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
