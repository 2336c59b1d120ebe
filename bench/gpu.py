"""The real job on one CUDA GPU, capped to a 12 GB card: does the rtx3060_12gb profile fit, how fast is it,
does out-of-memory recovery work, how long does generation take.

    python bench/gpu.py                      # on a CUDA GPU; writes bench/gpu.json (about 5 minutes)
    python bench/gpu.py --smoke              # the same logic on the CPU with the tiny test model (tests)

Phases, in one process (each a fresh run in a temporary folder, on synthetic 128-px demo data):

1. **plan**: the memory plan (``moas/train/plans.py``) of the profile for the 12 GB cap.
2. **bf16**: train with the plan applied under ``torch.cuda.set_per_process_memory_fraction`` (12 GB);
   images/s, peak allocated and reserved memory against the plan, model FLOP utilisation (FLOPs of one
   step from ``torch.utils.flop_counter`` on the meta device × steps/s ÷ the measured bf16 matmul peak).
3. **fp32**: the same without autocast (``train.mixed_precision = "no"``); images/s.
4. **compile**: bf16 with ``train.compile = true``; images/s, or the error if the compiled step fails.
5. **squeeze**: after a few steps the cap drops to ``--squeeze_gb`` so the next step runs out of memory;
   passes when training went on at a smaller micro-batch with the same effective batch.
6. **generate**: the trained model through ``moas generate``'s code at the enhancer's output size; seconds
   per image.

``--smoke`` runs every phase on the CPU with ``tests/tiny.toml`` (no memory cap: the squeeze is an
injected out-of-memory error, ``MOAS_INJECT=oom@N``; the compile phase is skipped), so the script's logic
is tested without a GPU. A number from ``--smoke`` is not a GPU number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from moas.config import load_config  # noqa: E402
from moas.data.synthetic import generate_demo_dataset  # noqa: E402
from moas.monitor.logs import setup_logging  # noqa: E402
from moas.train.loop import build_trainer  # noqa: E402
from moas.train.memory_plan import GB  # noqa: E402
from moas.train.plans import apply_memory_plan, memory_plan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def cap(gb: float | None) -> None:
    if gb is None or not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gb * GB / total), 0)


def run_config(a, data: Path, root: Path, **train):
    base = (None, ROOT / "tests" / "tiny.toml") if a.smoke else ("rtx3060_12gb", None)
    over = {
        "data": {"data_dir": str(data), "cache_dir": str(root / "cache"), "num_workers": 0 if a.smoke else 4},
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
    return cfg if a.smoke else apply_memory_plan(cfg, memory_plan(cfg, a.cap_gb))


def step_flops(cfg) -> int:
    """FLOPs of one generator forward + backward at the run's micro-batch, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from moas.models.generator import MoasGenerator
    from moas.text.encoder import HASH_ID, TextEncoder
    from moas.text.inputs import caption_inputs
    from moas.train.builders import generator_args

    b, r = cfg.train.batch_size, cfg.data.resolution
    text = caption_inputs(TextEncoder(require_id=HASH_ID), ["1girl, red hair, forest"] * b, "cpu")
    with torch.device("meta"):
        model = MoasGenerator(**generator_args(cfg)).train()
        x, t = torch.empty(b, 3, r, r), torch.zeros(b, dtype=torch.long)
    text = {k: v.to("meta") for k, v in text.items()}
    with FlopCounterMode(display=False) as fc:
        model(x, t, text).pred.float().square().mean().backward()
    return fc.get_total_flops()


def matmul_peak(dtype: torch.dtype, device: str, n: int = 4096) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def train_phase(a, data: Path, root: Path, squeeze_at: int | None = None, **train) -> dict:
    cfg = run_config(a, data, root, **train)
    cap(a.cap_gb)
    if torch.cuda.is_available() and not a.smoke:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if squeeze_at is not None and a.smoke:
        os.environ["MOAS_INJECT"] = f"oom@{squeeze_at}"
    t = build_trainer(cfg, progress=False, dashboard=False)
    os.environ.pop("MOAS_INJECT", None)
    start = (t.state.micro_batch, t.state.grad_accum)
    if squeeze_at is not None and not a.smoke:
        real = t._at_boundary

        def squeeze() -> bool:
            stop = real()
            if t.state.global_step == squeeze_at:
                torch.cuda.empty_cache()
                cap(a.squeeze_gb)
            return stop

        t._at_boundary = squeeze
    t0 = time.perf_counter()
    r = t.run()
    out = {
        "seconds": round(time.perf_counter() - t0, 1),
        "steps": r.global_step,
        "images_per_sec": round(r.images_per_sec, 3),
        "micro_batch_x_accum": [start, [r.micro_batch, r.grad_accum]],
        "model": str(r.model_path),
    }
    if torch.cuda.is_available() and not a.smoke:
        out["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
        out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 2)
    if squeeze_at is not None:
        emergencies = sorted((root / "ckpt").glob("emergency_oom*.pt"))
        out["emergency_checkpoints"] = [p.name for p in emergencies]
        out["passed"] = (
            bool(emergencies)
            and r.micro_batch < start[0]
            and r.micro_batch * r.grad_accum == start[0] * start[1]
            and r.global_step == a.steps
        )
    return out


def compile_phase(a, data: Path, root: Path, **train) -> dict:
    """bf16 with ``train.compile``; a failure inside the compiled step is a result, not a crash."""
    if a.smoke:  # inductor takes minutes on a CPU, and on this U-Net fails in the backward (bench/RESULTS.md)
        return {"skipped": "torch.compile is only measured on a GPU"}
    try:
        return train_phase(a, data, root, compile=True, **train)
    except Exception as e:  # noqa: BLE001 - the phase reports whatever compiling broke
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def generate_phase(a, model: str, out_dir: Path) -> dict:
    from moas.device import resolve_device
    from moas.inference.generate import GenerateRequest, generate
    from moas.inference.pipeline import Pipeline

    pipe = Pipeline.from_file(model, resolve_device("cpu" if a.smoke else "cuda"))
    side = pipe.resolution * (2 if a.smoke else 4)
    req = GenerateRequest(prompt="1girl, red hair, blue eyes, forest", width=side, height=side)
    req.steps, req.guidance_scale, req.sampler = pipe.settings()
    generate(pipe, req, out_dir / "warm.png", "bench", progress=False)
    t = time.perf_counter()
    generate(pipe, req, out_dir / "result.png", "bench", progress=False)
    return {"seconds_per_image": round(time.perf_counter() - t, 2), "size": side, "steps": req.steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="run the logic on the CPU with the tiny test model")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per phase (60; smoke: 4)")
    p.add_argument("--cap_gb", type=float, default=12.0, help="the card to imitate")
    p.add_argument("--squeeze_gb", type=float, default=8.0, help="the cap after the squeeze")
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu.json"))
    a = p.parse_args(argv)
    a.steps = a.steps or (4 if a.smoke else 60)
    if a.smoke:
        a.cap_gb = None
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (use --smoke to check its logic on the CPU).", file=sys.stderr)
        return 2
    setup_logging(None)
    device = "cpu" if a.smoke else "cuda"
    res: dict = {"smoke": a.smoke, "device": torch.cuda.get_device_name() if not a.smoke else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_demo_dataset(
            tmp / "demo", n_images=16 if a.smoke else 64, size=32 if a.smoke else 128, seed=0, progress=False
        )
        data = tmp / "demo" / "train"
        if not a.smoke:
            res["plan"] = memory_plan(run_config(a, data, tmp / "p"), a.cap_gb).describe()
        amp = {} if a.smoke else {"mixed_precision": "bf16"}
        res["bf16"] = train_phase(a, data, tmp / "bf16", **amp)
        cfg = run_config(a, data, tmp / "flops")
        flops = step_flops(cfg)
        peak = matmul_peak(torch.float32 if a.smoke else torch.bfloat16, device)
        ips = res["bf16"]["images_per_sec"]
        res["mfu"] = round(flops * ips / cfg.train.batch_size / peak, 4)
        res["matmul_peak_tflops"] = round(peak / 1e12, 3)
        res["fp32"] = train_phase(a, data, tmp / "fp32", mixed_precision="no")
        res["compile"] = compile_phase(a, data, tmp / "compile", **amp)
        res["squeeze"] = train_phase(a, data, tmp / "squeeze", squeeze_at=2 if a.smoke else 10, **amp)
        res["generate"] = generate_phase(a, res["bf16"]["model"], tmp)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0 if res["squeeze"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
