"""The conditioning brain's cost and effect: ``--conditioning moas`` against ``text``.

    python bench/brain.py steps                        # step time + FLOPs, cpu_tiny and rtx3060_12gb sizes
    python bench/brain.py steps --profiles cpu_tiny --iters 8
    python bench/brain.py routing --model models/best_model.safetensors --data_dir data/demo   # mean routing per expert
    python bench/brain.py compare --moas bench/brain_demo_moas.json --text bench/learning.json --steps bench/brain_steps.json

``steps`` builds both generators in one process and times full training steps (forward, backward, AdamW)
*interleaved* — text, moas, text, moas … — so machine load from other processes hits both alike. It
records wall time and process CPU time, and counts FLOPs per step with ``torch.utils.flop_counter`` (exact
and load-independent). The rtx3060_12gb size runs on this CPU at a small batch — it is a CPU number.

``routing`` runs a trained model's brain over every demo caption and reports each expert's mean routing
weight (the target: none below 1/56).

``compare`` converts a wall-time budget into a step budget with the measured moas/text step-time ratio and
reads held-out accuracy for both from ``bench/learning.py`` results.

``mi`` measures how readable per-tag routing is (``brain.tag_routing``): the mutual information between a
tag's keyword category and the expert it is routed to most, in bits, and each expert's mean weight over
the tags. With ``--model`` it reads a trained model (over ``--data_dir``'s captions, else built-in ones);
without, it builds a tiny generator with tag routing and expert targets, reports it at initialisation,
trains it ``--steps`` steps on synthetic images whose colour and layout follow their captions, and
reports it again:

    python bench/brain.py mi --steps 40                    # tiny model, < 2 min on 2 CPU cores
    python bench/brain.py mi --model models/best_model.safetensors --data_dir data/demo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from moas.config import load_config  # noqa: E402
from moas.models.generator import MoasGenerator  # noqa: E402
from moas.text.language import language_batch  # noqa: E402
from moas.train.trained_net import adamw  # noqa: E402

CAPTIONS = [
    "1girl, red hair, blue eyes, forest",
    "1girl, silver hair, green eyes, beach, smile",
    "1girl, black hair, purple eyes, city, night",
    "1girl, pink hair, yellow eyes, sakura",
]
BATCH = {"cpu_tiny": 32, "rtx3060_12gb": 2}


def _text(encoder, batch: int) -> dict[str, torch.Tensor]:
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    enc = encoder.encode(caps)
    return {
        "tokens": enc.tokens,
        "mask": enc.mask,
        "tags": enc.tags,
        "tag_mask": enc.tag_mask,
    } | language_batch(caps)


def measure_steps(
    profile: str, iters: int, encoder, batch: int | None = None, brain_set: dict | None = None
) -> dict:
    """Interleaved text/moas step times and FLOPs; ``brain_set`` overrides the moas arm's brain config."""
    cfg = load_config(profile, use_env=False, overrides={"brain": brain_set} if brain_set else None)
    res, bs = cfg.data.resolution, batch or BATCH.get(profile, 2)
    text = _text(encoder, bs)
    models, opts, flops, params = {}, {}, {}, {}
    for cond in ("text", "moas"):
        brain = asdict(cfg.brain) | {"conditioning": cond}
        torch.manual_seed(0)
        m = MoasGenerator(res, asdict(cfg.model), asdict(cfg.text), brain=brain).train()
        models[cond] = m
        opts[cond] = adamw(m.parameters(), lr=1e-4, amsgrad=True)  # as the trainer builds it
        params[cond] = sum(p.numel() for p in m.parameters())

    def step(cond: str) -> None:
        m = models[cond]
        x = torch.randn(bs, 3, res, res)
        inputs = text | {"aux_image": x.clamp(-1, 1), "aux_mask": torch.ones(bs, dtype=torch.bool)}
        pred, aux = m(x, torch.randint(0, 1000, (bs,)), inputs)
        (pred.float().pow(2).mean() + aux).backward()
        opts[cond].step()
        opts[cond].zero_grad(set_to_none=True)

    for cond in models:  # FLOPs of one step (forward + backward), and a warm-up
        counter = FlopCounterMode(display=False)
        with counter:
            step(cond)
        flops[cond] = counter.get_total_flops()
    wall: dict[str, list[float]] = {"text": [], "moas": []}
    cpu: dict[str, list[float]] = {"text": [], "moas": []}
    for i in range(iters):
        order = ("text", "moas") if i % 2 == 0 else ("moas", "text")
        for cond in order:
            t0, c0 = time.perf_counter(), time.process_time()
            step(cond)
            wall[cond].append(time.perf_counter() - t0)
            cpu[cond].append(time.process_time() - c0)
    # Ratios per interleaved pair, then the median: robust to load bursts that hit one step of a pair.
    ratio_wall = statistics.median(m / t for m, t in zip(wall["moas"], wall["text"], strict=True))
    ratio_cpu = statistics.median(m / t for m, t in zip(cpu["moas"], cpu["text"], strict=True))
    row = {
        "profile": profile,
        "brain_set": brain_set or {},
        "resolution": res,
        "batch": bs,
        "iters": iters,
        "params_text": params["text"],
        "params_moas": params["moas"],
        "gflop_text": round(flops["text"] / 1e9, 2),
        "gflop_moas": round(flops["moas"] / 1e9, 2),
        "flop_overhead": round(flops["moas"] / flops["text"] - 1, 4),
        "wall_median_text_s": round(statistics.median(wall["text"]), 3),
        "wall_median_moas_s": round(statistics.median(wall["moas"]), 3),
        "wall_ratio_median": round(ratio_wall, 3),
        "cpu_ratio_median": round(ratio_cpu, 3),
        "wall_text_s": [round(v, 3) for v in wall["text"]],
        "wall_moas_s": [round(v, 3) for v in wall["moas"]],
        "load_avg": os.getloadavg(),
    }
    print(
        f"{profile:>13} {res}px batch {bs}: params {params['text'] / 1e6:.1f}M → {params['moas'] / 1e6:.1f}M; "
        f"FLOPs/step {row['gflop_text']:.1f} → {row['gflop_moas']:.1f} G (+{100 * row['flop_overhead']:.0f} %); "
        f"step median {row['wall_median_text_s']:.2f} s → {row['wall_median_moas_s']:.2f} s; "
        f"moas/text per pair: wall ×{ratio_wall:.2f}, CPU ×{ratio_cpu:.2f}; load {row['load_avg'][0]:.1f}",
        flush=True,
    )
    return row


@torch.no_grad()
def routing_report(model_path: str, data_dir: str, max_captions: int = 0) -> dict:
    from moas.data.dataset import ArtDataset
    from moas.inference.pipeline import Pipeline

    pipe = Pipeline.from_file(model_path, torch.device("cpu"))
    ds = ArtDataset(Path(data_dir) / "train", pipe.resolution, None)
    captions = sorted(set(ds.captions()))
    if max_captions and len(captions) > max_captions:  # an even, deterministic subset
        captions = captions[:: len(captions) // max_captions][:max_captions]
    moe = pipe.model.stage("moe")
    if moe is None:
        raise SystemExit(f"{model_path} is a text-only model; it has no routing.")
    rows = []
    for i in range(0, len(captions), 64):
        text = {k: v for k, v in pipe.encode(captions[i : i + 64]).items()}
        rows.append(pipe.model.condition(text)["routing"].float())
    routing = torch.cat(rows)  # (N, 14)
    mean = routing.mean(0)
    report = {
        "model": str(model_path),
        "captions": len(captions),
        "mean_routing": {n: round(float(v), 5) for n, v in zip(moe.names, mean, strict=True)},
        "min": float(mean.min()),
        "max": float(mean.max()),
        "threshold_1_56": 1 / 56,
        "all_above_threshold": bool((mean >= 1 / 56).all()),
        "temperature": float(moe.temperature),
        "balance_bias": [round(float(b), 4) for b in moe.balance_bias],
    }
    for n, v in report["mean_routing"].items():
        print(f"  {n:<10} {v:.4f}")
    print(f"min {report['min']:.4f} (1/56 = {1 / 56:.4f}); all above: {report['all_above_threshold']}")
    return report


TINY_MI_BRAIN = {  # tiny widths, every specialisation switch on
    "expert_dim": 32,
    "router_hidden": [32, 32],
    "hidden_dim": 32,
    "expert_heads": 4,
    "cross_expert_heads": 4,
    "gnn_layers": 2,
    "gnn_heads": 4,
    "understanding_layers": 1,
    "understanding_heads": 4,
    "understanding_ff": 32,
    "understanding_token_dim": None,
    "panel_memory": False,
    "tag_routing": True,
    "aux_targets": 0.1,
    "expert_tokens": True,
}
MI_PARTS = {  # tag → (colour (R, G, B) in [-1, 1] or None, bright top half?) for the synthetic images
    "red hair": ((1.0, -0.8, -0.8), None),
    "blue hair": ((-0.8, -0.6, 1.0), None),
    "green hair": ((-0.7, 0.9, -0.7), None),
    "white background": ((0.9, 0.9, 0.9), None),
    "night": ((-0.9, -0.9, -0.6), None),
    "sunlight": (None, True),
    "backlighting": (None, False),
    "from above": (None, None),
    "sitting": (None, None),
    "masterpiece": (None, None),
    "1girl": (None, None),
    "smile": (None, None),
}


def mi_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions of 2–4 tags drawn from MI_PARTS (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    tags = list(MI_PARTS)
    out = []
    for _ in range(n):
        k = int(torch.randint(2, 5, (), generator=gen))
        out.append(", ".join(tags[int(i)] for i in torch.randperm(len(tags), generator=gen)[:k]))
    return out


def mi_image(caption: str, res: int) -> torch.Tensor:
    """A synthetic image in [-1, 1] whose colour and light follow the caption's tags."""
    img = torch.zeros(3, res, res)
    for tag in caption.split(", "):
        colour, top = MI_PARTS.get(tag, (None, None))
        if colour is not None:
            img += torch.tensor(colour).view(3, 1, 1) * 0.5
        if top is not None:
            img[:, : res // 2] += 0.4 if top else -0.4
    return img.clamp(-1, 1)


@torch.no_grad()
def mi_report(model, encode, captions: list[str]) -> dict:
    from moas.models.routing_info import entropy_bits, mutual_information, tag_choices

    was_training, moe = model.training, model.stage("moe")
    model.eval()
    cats, choice, rows = tag_choices(model.condition, encode, captions)
    # The router alone (prior bias off): how much of the category structure it has learned itself.
    prior, moe.tag_prior = moe.tag_prior, 0.0
    try:
        _, own_choice, _ = tag_choices(model.condition, encode, captions)
    finally:
        moe.tag_prior = prior
        model.train(was_training)
    return {
        "tags": len(cats),
        "mi_bits": round(mutual_information(cats, choice), 4),
        "mi_bits_without_prior": round(mutual_information(cats, own_choice), 4),
        "h_category_bits": round(entropy_bits(cats), 4),
        "h_expert_bits": round(entropy_bits(choice), 4),
        "mean_weight": {n: round(float(v), 4) for n, v in zip(moe.names, rows.mean(0), strict=True)},
    }


def _print_mi(label: str, r: dict) -> None:
    weights = " ".join(f"{n}={v:.3f}" for n, v in r["mean_weight"].items())
    print(
        f"{label:>10}: MI {r['mi_bits']:.3f} bits, without the prior {r['mi_bits_without_prior']:.3f} "
        f"(H(category) {r['h_category_bits']:.3f}, H(expert) {r['h_expert_bits']:.3f}) over {r['tags']} tags"
        f"\n            mean weight: {weights}",
        flush=True,
    )


def mi_tiny(steps: int, encoder, n_captions: int = 64, batch: int = 8) -> dict:
    """Build a tiny tag-routing generator, report it, train it ``steps`` steps, report it again."""
    from moas.config import DiffusionConfig
    from moas.diffusion.objective import DiffusionObjective
    from moas.diffusion.schedule import NoiseSchedule, make_train_scheduler
    from moas.text.inputs import caption_inputs

    cfg = load_config("cpu_tiny", use_env=False)
    res = 16
    brain = asdict(cfg.brain) | TINY_MI_BRAIN
    model = asdict(cfg.model) | {"block_channels": [32, 32], "cross_attention": [False, True]}
    torch.manual_seed(0)
    gen = MoasGenerator(res, model | {"attention_head_dim": 16}, asdict(cfg.text), brain=brain)
    dc = DiffusionConfig()
    objective = DiffusionObjective(
        NoiseSchedule(make_train_scheduler(dc), dc.prediction_type, dc.min_snr_gamma)
    )
    captions = mi_captions(n_captions)
    encode = lambda caps: caption_inputs(encoder, caps, "cpu")  # noqa: E731
    report = {"brain": brain, "steps": steps, "init": mi_report(gen, encode, captions)}
    _print_mi("init", report["init"])
    opt = adamw(gen.parameters(), lr=1e-3)
    rng = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(captions), (batch,), generator=rng).tolist()
        caps = [captions[i] for i in idx]
        x0 = torch.stack([mi_image(c, res) for c in caps])  # (B, 3, res, res)
        cond = encode(caps) | {"aux_image": x0, "aux_mask": torch.ones(batch, dtype=torch.bool)}
        t = torch.randint(0, objective.num_timesteps, (batch,), generator=rng)
        out = objective(gen, x0, cond, t, torch.randn(x0.shape, generator=rng))
        (out.loss + out.aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    report["train_seconds"] = round(time.perf_counter() - t0, 1)
    report["trained"] = mi_report(gen, encode, captions)
    _print_mi(f"{steps} steps", report["trained"])
    return report


def mi_model(model_path: str, data_dir: str | None, max_captions: int = 256) -> dict:
    """MI and mean weights of a trained model with tag routing."""
    from moas.inference.pipeline import Pipeline

    pipe = Pipeline.from_file(model_path, torch.device("cpu"))
    if not getattr(pipe.model, "tag_routing", False):
        raise SystemExit(f"{model_path} was trained without brain.tag_routing; it has no per-tag routing.")
    captions = mi_captions(max_captions)
    if data_dir:
        from moas.data.dataset import ArtDataset

        ds = ArtDataset(Path(data_dir) / "train", pipe.resolution, None)
        captions = sorted(set(ds.captions()))[:max_captions]
    report = {"model": str(model_path), "trained": mi_report(pipe.model, pipe.encode, captions)}
    _print_mi("model", report["trained"])
    return report


def _interp(rows: list[dict], key: str, at: float) -> tuple[float, bool]:
    """Held-out mean at ``at`` (train seconds or epochs), linear between checkpoints; True if extrapolated."""
    pts = sorted((float(r[key]), float(r["held_out"]["mean"])) for r in rows if r.get(key) is not None)
    if at <= pts[0][0]:
        return pts[0][1], at < pts[0][0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= at <= x1:
            return y0 + (y1 - y0) * (at - x0) / max(x1 - x0, 1e-9), False
    return pts[-1][1], True


def compare(moas_json: str, text_json: str, steps_json: str) -> dict:
    """Held-out accuracy of moas and text conditioning at equal training wall time, two ways.

    1. Measured time: both runs record cumulative training seconds per checkpoint. When they ran side by
       side on the same machine (one thread each), load hit both alike, so the moas accuracy interpolated
       at the text run's final training time is the equal-wall-time figure.
    2. Step ratio: the text run's epochs divided by the interleaved moas/text step-time ratio of
       ``bench/brain.py steps`` gives the epochs moas gets in the same time (robust to load changes).
    """
    moas, text = json.loads(Path(moas_json).read_text()), json.loads(Path(text_json).read_text())
    steps = {r["profile"]: r for r in json.loads(Path(steps_json).read_text())["rows"]}
    ratio = steps["cpu_tiny"]["wall_ratio_median"]
    text_final, moas_final = text["rows"][-1], moas["rows"][-1]
    t_budget = float(text_final["train_seconds"])
    acc_time, extrap_time = _interp(moas["rows"], "train_seconds", t_budget)
    budget_epochs = text_final["epoch"] / ratio
    acc_ratio, extrap_ratio = _interp(moas["rows"], "epoch", budget_epochs)
    same_epochs = {
        r["epoch"]: {"text": r["held_out"]["mean"]} for r in text["rows"] if r.get("epoch") is not None
    }
    for r in moas["rows"]:
        if r.get("epoch") in same_epochs:
            same_epochs[r["epoch"]]["moas"] = r["held_out"]["mean"]
    out = {
        "text_final": {
            "epoch": text_final["epoch"],
            "train_seconds": t_budget,
            "held_out": text_final["held_out"]["mean"],
        },
        "moas_final": {
            "epoch": moas_final["epoch"],
            "train_seconds": moas_final["train_seconds"],
            "held_out": moas_final["held_out"]["mean"],
        },
        "measured_time": {
            "moas_held_out_at_text_time": round(acc_time, 4),
            "extrapolated": extrap_time,
            "moas_over_text_time_ratio": round(float(moas_final["train_seconds"]) / t_budget, 3),
        },
        "step_ratio": {
            "moas_over_text_step": ratio,
            "moas_budget_epochs": round(budget_epochs, 2),
            "moas_held_out_at_budget": round(acc_ratio, 4),
            "extrapolated": extrap_ratio,
        },
        "per_epoch": same_epochs,
    }
    print(json.dumps(out, indent=2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("steps", help="step time and FLOPs, moas vs text")
    s.add_argument("--profiles", nargs="+", default=["cpu_tiny", "rtx3060_12gb"])
    s.add_argument("--iters", type=int, default=6, help="interleaved steps per conditioning")
    s.add_argument("--out", default="bench/brain_steps.json")
    s.add_argument(
        "--brain",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="brain config override for both arms, TOML value syntax (repeatable), e.g. tag_routing=true",
    )
    r = sub.add_parser(
        "routing", help="mean routing weight per expert of a trained model on the demo captions"
    )
    r.add_argument("--model", required=True)
    r.add_argument("--data_dir", default="data/demo")
    r.add_argument("--out", default="bench/brain_routing.json")
    r.add_argument("--max_captions", type=int, default=0, help="use an even subset of the captions (0 = all)")
    c = sub.add_parser("compare", help="held-out accuracy of moas vs text at equal wall time")
    c.add_argument("--moas", required=True)
    c.add_argument("--text", required=True)
    c.add_argument("--steps", default="bench/brain_steps.json")
    c.add_argument("--out", default="bench/brain_compare.json")
    i = sub.add_parser("mi", help="mutual information of tag category and routed expert (tag routing)")
    i.add_argument("--model", default=None, help="a trained model with brain.tag_routing (default: tiny)")
    i.add_argument("--data_dir", default=None, help="with --model: use this folder's captions")
    i.add_argument("--steps", type=int, default=40, help="without --model: training steps of the tiny model")
    i.add_argument("--out", default="bench/brain_mi.json")
    ap.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 is steadier on a loaded machine)"
    )
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(a.threads, os.cpu_count() or 1)))
    if a.cmd == "steps":
        from moas.text.encoder import TextEncoder

        encoder = TextEncoder()
        from moas.config import tomllib

        brain_set = {k: tomllib.loads(f"v = {v}")["v"] for k, _, v in (b.partition("=") for b in a.brain)}
        rows = [measure_steps(p, a.iters, encoder, brain_set=brain_set) for p in a.profiles]
        report = {
            "machine": {
                "cores": psutil.cpu_count(),
                "threads_used": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "note": "CPU only; shared with other jobs (see load_avg per row)",
            },
            "rows": rows,
        }
    elif a.cmd == "routing":
        report = routing_report(a.model, a.data_dir, a.max_captions)
    elif a.cmd == "mi" and a.model:
        report = mi_model(a.model, a.data_dir)
    elif a.cmd == "mi":
        from moas.text.encoder import TextEncoder

        report = mi_tiny(a.steps, TextEncoder())
    else:
        report = compare(a.moas, a.text, a.steps)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
