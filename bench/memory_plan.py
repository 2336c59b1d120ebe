"""The memory predictor against measured allocator peaks on the CPU, and the plans of the profiles.

    python bench/memory_plan.py            # writes bench/memory_plan.json and prints a table

For small generator configurations (the tiny test model and a mid-size one, several micro-batches and
resolutions) one real fp32 training step (forward, backward, AMSGrad step) runs on the CPU under the torch
profiler with memory profiling; the peak of the allocator's live bytes during the step (allocated inside
the step, plus the weights and moments the step touches) is compared with the predictor's
``state + BACKWARD_FACTOR × traced activations`` (``moas/train/memory_plan.py``; the state here is weights,
gradients and AMSGrad moments — the measured step has no EMA copy). ``factor_measured`` is the factor that
would have been exact; the table gives the predictor's error at each point. Then the memory plan of
each profile on a 12 GB card is printed. Nothing here runs on a GPU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from moas.config import load_config  # noqa: E402
from moas.models.generator import MoasGenerator  # noqa: E402
from moas.text.encoder import HASH_ID, TextEncoder  # noqa: E402
from moas.text.inputs import caption_inputs  # noqa: E402
from moas.train.builders import generator_args  # noqa: E402
from moas.train.memory_plan import BACKWARD_FACTOR, state_bytes, traced_activation_bytes  # noqa: E402
from moas.train.plans import memory_plan  # noqa: E402
from moas.train.trained_net import adamw  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20
MID = {"model": {"block_channels": [64, 128, 128], "cross_attention": [False, True, True]}}
POINTS = [  # (name, config overrides, micro-batch, resolution)
    ("tiny", {}, 2, 16),
    ("tiny", {}, 8, 16),
    ("tiny", {}, 4, 32),
    ("mid", MID, 2, 32),
    ("mid", MID, 4, 32),
    ("mid", MID, 2, 64),
    ("mid", MID, 4, 64),
    ("mid", MID, 2, 96),
]


def measured_peak(step) -> int:
    """Peak live bytes allocated while ``step()`` runs, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as p:
        step()
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return max(sum(s) for s in sizes)


def one_point(overrides: dict, batch: int, res: int) -> dict:
    cfg = load_config(
        None, ROOT / "tests" / "tiny.toml", {**overrides, "data": {"resolution": res}}, use_env=False
    )
    enc = TextEncoder(require_id=HASH_ID, max_tokens=cfg.text.max_tokens)
    text = caption_inputs(
        enc, ["1girl, red hair, blue eyes, forest, smile, looking at viewer"] * batch, "cpu"
    )
    x = torch.randn(batch, 3, res, res)
    t = torch.randint(0, 1000, (batch,))

    def loss_of(model):
        return model(x.to(next(model.parameters()).device), t.to(x.device), text).pred.float().square().mean()

    with torch.device("meta"):
        meta = MoasGenerator(**generator_args(cfg)).train()
    meta_text = {k: v.to("meta") for k, v in text.items()}
    xm, tm = x.to("meta"), t.to("meta")
    act = traced_activation_bytes(lambda: meta(xm, tm, meta_text).pred.float().square().mean())
    model = MoasGenerator(**generator_args(cfg)).train()
    opt = adamw(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, amsgrad=True)

    def step():
        loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer's moments exist before the measured step, as in a run
    peak = measured_peak(step)
    s = state_bytes(model, [], amsgrad=True, amp_bytes=None)
    state = s.total - s.ema  # the measured step has no EMA copy
    predicted = state + BACKWARD_FACTOR * act
    return {
        "micro_batch": batch,
        "resolution": res,
        "state_mb": round(state / MB, 1),
        "traced_activations_mb": round(act / MB, 1),
        "measured_peak_mb": round(peak / MB, 1),
        "predicted_mb": round(predicted / MB, 1),
        "factor_measured": round((peak - state) / act, 3),
        "error": round(predicted / peak - 1, 3),
    }


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rows = []
    for name, overrides, batch, res in POINTS:
        row = {"model": name, **one_point(overrides, batch, res)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    plans = {
        p: memory_plan(load_config(p, use_env=False), 11.4).describe() for p in ("rtx3060_12gb", "original")
    }
    for p, text in plans.items():
        print(f"\n{p}:\n{text}")
    out = {
        "points": rows,
        "backward_factor": BACKWARD_FACTOR,
        "plans_12gb": plans,
        "machine": os.uname().machine,
    }
    (ROOT / "bench" / "memory_plan.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
