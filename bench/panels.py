"""Panels: does the panel memory make later panels more consistent after training?

    python bench/panels.py                          # cpu_tiny, 12 epochs, 350 sequences, 32 eval sequences
    python bench/panels.py --epochs 4 --sequences 60 --m 8      # a quick smoke run
    python bench/panels.py --reuse                  # evaluate the already trained model again
    python bench/panels.py --reuse --probe_gate 0.5 0.9   # + the model with tanh(memory_gate) forced

Why the data is special: in the ordinary demo sequences every panel's caption names the hair and eye
colour, so the prompt alone fixes them and the memory has nothing to add. Here the training sequences
are made with ``sequence_tag_drop`` (default 0.8): panels 2.. usually lack the "<colour> hair" /
"<colour> eyes" tags, as later comic panels have brief descriptions. The only place the colour of a
later panel can then come from is the previous panels — the memory expert's input.

1. Data: a sequences-only demo folder (few ordinary images, ``--sequences`` 3-4 panel sequences at 64 px)
   in ``--workdir`` (git-ignored ``bench/_work_panels``).
2. Train ``--profile`` (cpu_tiny) on it with ``moas.train.loop.train`` (enhancer training off, 1 CPU
   thread, the default monitor, which also picks the saved model by its quality score).
3. Evaluate on ``--m`` NEW sequences (written by the same generator with another seed, so the attributes
   are drawn the same way but no file is a training file): panel 1's prompt is the full caption, panels
   2-3 get the brief caption without hair/eye colour. All M sequences are generated batched per panel
   position, twice with the same seeds: (a) with memory, panel k sees panels 1..k-1; (b) without
   (``panels=None``). Panels 2-3 are scored with ``moas.eval.attributes.measure_attributes`` against the
   sequence's intended hair / eye colour (panel 1's; chance 1/8 and 1/6) and against the colour measured
   on the generated panel 1 (does the later panel repeat what panel 1 actually shows?), and with
   ``sequence_metrics`` (temporal consistency of consecutive panels; lower = more consistent). References:
   panel-1 accuracy (the same generation in both arms: must match), the same measurements on the real
   eval panels (the measurement's ceiling on reframed panels), the temporal metric of unrelated pairs
   (panel 2 of one sequence against panel 1 of the next) and the learned gate ``tanh(memory_gate)``.
4. Optional diagnostic (``--probe_gate``): the saved model again with ``tanh(memory_gate)`` overwritten,
   to see whether the memory pathway behind the gate carries anything when the gate is open. The gate
   scales the memory weights' gradients too, so a gate that stayed near 0 leaves them barely trained:
   a probe that changes pixels but not colour accuracy says "open but uninformative".
   For every evaluated model ``memory_signal`` also gives the relative change that the memory makes to
   each conditioning stage (memory expert state, MoE output, the U-Net's context and pooled inputs).

Writes ``--out`` (bench/panels.json) and prints a table. Evaluation time is not training time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from moas.config import load_config, tomllib  # noqa: E402
from moas.data.dataset import center_crop_resize, to_model_range  # noqa: E402
from moas.data.synthetic import EYE_COLORS, HAIR_COLORS, generate_demo_dataset, held_out_pairs  # noqa: E402
from moas.data.synthetic_panels import write_sequences  # noqa: E402
from moas.eval.attributes import measure_attributes  # noqa: E402
from moas.inference.model_file import read_model_file  # noqa: E402
from moas.inference.pipeline import Pipeline  # noqa: E402
from moas.losses.temporal import sequence_metrics  # noqa: E402
from moas.monitor.logs import setup_logging  # noqa: E402
from moas.train.loop import train  # noqa: E402

N_PANELS = 3  # panels generated per eval sequence (every demo sequence has at least 3)
COLOURS = ("hair_color", "eye_color")


def training_data(path: Path, n_images: int, sequences: int, tag_drop: float, seed: int) -> dict:
    """The training folder, regenerated only when its manifest does not match the requested settings."""
    want = {"n_images": n_images, "seed": seed, "size": 64}
    m = path / "manifest.json"
    if m.is_file():
        old = json.loads(m.read_text(encoding="utf-8"))
        same = all(old.get(k) == v for k, v in want.items()) and len(old.get("sequences", [])) == sequences
        if same and old.get("sequence_tag_drop", 0.0) == tag_drop:
            return old
    return generate_demo_dataset(
        path, n_images=n_images, size=64, seed=seed, sequences=sequences, sequence_tag_drop=tag_drop
    )


def eval_sequences(path: Path, m: int, seed: int, train_seed: int, artists: list[str]) -> list[dict]:
    """M new sequences: same generator and held-out pairs as training, another seed, later panels brief.

    ``tag_drop`` 1.0 removes the hair and eye colour from every caption after the first."""
    for a in artists:
        (path / "train" / a).mkdir(parents=True, exist_ok=True)
    entries, _ = write_sequences(path, m, 64, seed, artists, held_out_pairs(train_seed), tag_drop=1.0)
    return entries


def load_panel(path: Path, size: int) -> torch.Tensor:
    """A real panel as the model sees it: uint8 (3, size, size)."""
    img = center_crop_resize(Image.open(path).convert("RGB"), size)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def measure(img: torch.Tensor) -> dict:
    """Hair / eye colour of a uint8 (3, H, W) image."""
    return measure_attributes(img.permute(1, 2, 0).numpy())


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value for paired binary outcomes (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * p)


def score(seqs: list[dict], panels: list[torch.Tensor], weights: tuple[float, float]) -> dict:
    """Attribute and temporal scores of one arm. ``panels[k]``: uint8 (M, 3, H, W) of panel position k."""
    meas = [[measure(panels[k][i]) for k in range(N_PANELS)] for i in range(len(seqs))]
    out: dict = {"panel1": {}, "later": {}, "later_vs_panel1": {}, "per_position": {}}
    for a in COLOURS:
        out["panel1"][a] = float(np.mean([m[0][a] == s[a] for m, s in zip(meas, seqs, strict=True)]))
        later = [m[k][a] == s[a] for m, s in zip(meas, seqs, strict=True) for k in range(1, N_PANELS)]
        out["later"][a] = float(np.mean(later))
        agree = [m[k][a] == m[0][a] for m in meas for k in range(1, N_PANELS)]
        out["later_vs_panel1"][a] = float(np.mean(agree))
        for k in range(1, N_PANELS):
            hits = [m[k][a] == s[a] for m, s in zip(meas, seqs, strict=True)]
            out["per_position"].setdefault(f"panel{k + 1}", {})[a] = float(np.mean(hits))
    temporal = []
    for i in range(len(seqs)):
        seq = to_model_range(torch.stack([panels[k][i] for k in range(N_PANELS)]))
        temporal.append(sequence_metrics(seq, *weights)["mean"]["temporal_consistency"])
    out["temporal"] = float(np.mean(temporal))
    # Unrelated pairs for scale: panel 2 of sequence i against panel 1 of sequence i+1.
    unrelated = []
    for i in range(len(seqs)):
        pair = torch.stack([panels[0][(i + 1) % len(seqs)], panels[1][i]])
        unrelated.append(sequence_metrics(to_model_range(pair), *weights)["mean"]["temporal_consistency"])
    out["temporal_unrelated"] = float(np.mean(unrelated))
    out["_hits"] = {
        a: [m[k][a] == s[a] for m, s in zip(meas, seqs, strict=True) for k in range(1, N_PANELS)]
        for a in COLOURS
    }
    out["_temporal"] = temporal
    out["_measured"] = [[{a: m[k][a] for a in COLOURS} for k in range(N_PANELS)] for m in meas]
    return out


def evaluate(pipe: Pipeline, seqs: list[dict], cfg, seed: int, weights: tuple[float, float]) -> dict:
    """Both arms on the same seeds; returns per-arm scores, paired comparisons and timing."""
    m = len(seqs)
    prompts = [[s["panels"][k]["caption"] for s in seqs] for k in range(N_PANELS)]
    seeds = [[seed + 10 * i + k for i in range(m)] for k in range(N_PANELS)]
    kw = {
        "steps": cfg.sample.steps,
        "guidance_scale": cfg.sample.guidance_scale,
        "sampler": cfg.sample.sampler,
        "batch_size": m,
    }
    arms, t0 = {}, time.perf_counter()
    for arm in ("memory", "no_memory"):
        out: list[torch.Tensor] = []
        for k in range(N_PANELS):
            hist = None
            if arm == "memory" and k > 0:
                hist = torch.stack(out[::-1], dim=1)  # (M, k, 3, H, W), nearest first
            out.append(pipe(prompts[k], seeds[k], panels=hist, **kw))
        arms[arm] = out
    gen_s = time.perf_counter() - t0
    res = {arm: score(seqs, p, weights) for arm, p in arms.items()}
    res["panel1_identical"] = bool(torch.equal(arms["memory"][0], arms["no_memory"][0]))
    # How much the memory changes the pixels at all (uint8 levels, panels 2-3): 0 = memory ignored.
    res["mean_abs_pixel_diff_later"] = float(
        np.mean(
            [
                (arms["memory"][k].float() - arms["no_memory"][k].float()).abs().mean()
                for k in range(1, N_PANELS)
            ]
        )
    )
    paired = {}
    for a in COLOURS:
        w = sum(
            x and not y for x, y in zip(res["memory"]["_hits"][a], res["no_memory"]["_hits"][a], strict=True)
        )
        lo = sum(
            y and not x for x, y in zip(res["memory"]["_hits"][a], res["no_memory"]["_hits"][a], strict=True)
        )
        paired[a] = {"memory_only_right": w, "no_memory_only_right": lo, "sign_test_p": sign_test(w, lo)}
    d = np.array(res["memory"]["_temporal"]) - np.array(res["no_memory"]["_temporal"])
    paired["temporal_diff_mean"] = float(d.mean())
    paired["temporal_diff_se"] = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    paired["temporal_memory_lower_in"] = int((d < 0).sum())
    res["paired"] = paired
    res["generate_s"] = round(gen_s, 1)
    for arm, ps in arms.items():  # the generated strips, for a look
        strips = torch.cat([torch.cat(list(p), dim=-1) for p in ps], dim=-2)  # (3, 3H, M·W)
        Image.fromarray(strips.permute(1, 2, 0).numpy()).save(f"eval_{arm}.png")
    return res


def real_reference(seqs: list[dict], root: Path, size: int, weights: tuple[float, float]) -> dict:
    """The same measurements on the real eval panels (64 px files as the model sees them at ``size``)."""
    panels = [
        torch.stack([load_panel(root / s["panels"][k]["file"], size) for s in seqs]) for k in range(N_PANELS)
    ]
    r = score(seqs, panels, weights)
    return {k: v for k, v in r.items() if not k.startswith("_")}


@torch.no_grad()
def memory_signal(pipe: Pipeline, seqs: list[dict], root: Path, size: int) -> dict:
    """How far the memory reaches: relative change ‖with − without‖ / ‖without‖ of each conditioning stage.

    Panel 2's brief prompts, with the real panel 1 as memory vs no memory. ``expert_states`` is all 14
    experts, ``memory_expert`` the memory expert's row alone; ``context`` and ``pooled`` are what the
    U-Net receives. Tiny values at the U-Net's inputs mean the memory cannot change the image, whatever
    the memory encodes."""
    model = pipe.model
    prev = torch.stack([load_panel(root / s["panels"][0]["file"], size) for s in seqs])[
        :, None
    ]  # (M,1,3,H,W)
    text = {k: v.to(pipe.device) for k, v in pipe.encode([s["panels"][1]["caption"] for s in seqs]).items()}
    mem = dict(text, panel_images=prev.to(pipe.device))
    mem["panel_mask"] = torch.ones(prev.shape[:2], dtype=torch.bool, device=pipe.device)
    a, b = model.condition(mem), model.condition(text)

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-12))

    out = {k: rel(a[k], b[k]) for k in ("expert_states", "moe_output", "context", "pooled") if k in a}
    i = model.stage("moe").experts.memory_expert
    if "expert_states" in a and i is not None:
        out["memory_expert"] = rel(a["expert_states"][:, i], b["expert_states"][:, i])
    return out


def gate_value(pipe: Pipeline) -> float | None:
    moe = pipe.model.stage("moe")
    gate = getattr(getattr(moe, "experts", None), "memory_gate", None)
    return None if gate is None else float(torch.tanh(gate.detach().float()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--workdir", default="bench/_work_panels", help="scratch folder (data, checkpoints, runs)"
    )
    ap.add_argument("--profile", default="cpu_tiny")
    ap.add_argument("--epochs", type=int, default=None, help="default: the profile's")
    ap.add_argument("--n_images", type=int, default=60, help="ordinary (non-sequence) demo images")
    ap.add_argument("--sequences", type=int, default=350, help="training sequences (3-4 panels each)")
    ap.add_argument("--tag_drop", type=float, default=0.8, help="sequence_tag_drop of the training data")
    ap.add_argument("--m", type=int, default=32, help="eval sequences")
    ap.add_argument("--eval_seed", type=int, default=1, help="seed of the eval sequences (not the data's 0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="skip training if the model file exists")
    ap.add_argument(
        "--probe_gate",
        type=float,
        nargs="*",
        default=[],
        help="diagnostic: also evaluate the model with tanh(memory_gate) forced to each value (-1 < v < 1)",
    )
    ap.add_argument("--out", default="bench/panels.json")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config override (TOML value)",
    )
    a = ap.parse_args()
    data_seed = 0
    if a.eval_seed == data_seed:
        ap.error("--eval_seed must differ from the training data's seed 0 (the eval sequences must be new)")

    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out).resolve()
    os.chdir(work)
    setup_logging(None)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    manifest = training_data(Path("data/demo"), a.n_images, a.sequences, a.tag_drop, data_seed)
    data_s = time.perf_counter() - t0
    n_panels = sum(len(s["panels"]) for s in manifest["sequences"])
    later = [p for s in manifest["sequences"] for p in s["panels"][1:]]
    kept = (
        {c: float(np.mean([p["kept_tags"][c] for p in later])) for c in COLOURS} if a.tag_drop > 0 else None
    )

    overrides: dict = {
        "data": {"data_dir": "data/demo/train"},
        "enhance": {"train": False},
        "resources": {"cpu_threads": a.threads},
        "train": {
            "checkpoint_dir": "checkpoints",
            "save_path": "models/panels.safetensors",
            "sample_every": 0,
        },
    }
    if a.epochs:
        overrides["train"]["epochs"] = a.epochs
    for item in a.set:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        overrides.setdefault(section, {})[field] = tomllib.loads(f"v = {value}")["v"]
    cfg = load_config(a.profile, overrides=overrides, use_env=False)
    model_path = Path(cfg.train.save_path)
    meta_path = Path("train_meta.json")
    if a.reuse and model_path.is_file() and meta_path.is_file():
        train_meta = json.loads(meta_path.read_text())
    else:
        for old in Path("checkpoints").glob("epoch_*"):
            old.unlink()
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        result = train(cfg, progress=True, dashboard=False)
        wall = time.perf_counter() - t0
        train_meta = {
            "train_wall_s": round(wall, 1),
            "epochs": result.epochs_done,
            "global_step": result.global_step,
            "final_loss": result.final_loss,
            "images_per_sec": round(result.images_per_sec, 2),
            "load_avg_start": load0,
            "load_avg_end": os.getloadavg(),
            "model_path": str(result.model_path),
            "last_model_path": str(result.last_model_path) if result.last_model_path else None,
        }
        meta_path.write_text(json.dumps(train_meta, indent=2))
        print(f"trained {result.epochs_done} epochs in {wall / 60:.1f} min", flush=True)

    seqs = eval_sequences(
        Path("eval_sequences"), a.m, a.eval_seed, data_seed, list(manifest["attributes"]["artist"])
    )
    train_captions = {p["caption"] for s in manifest["sequences"] for p in s["panels"]}
    overlap = sum(p["caption"] in train_captions for s in seqs for p in s["panels"][:N_PANELS])
    weights = (cfg.losses.temporal_character_weight, cfg.losses.temporal_scene_weight)
    report: dict = {
        "profile": a.profile,
        "settings": {
            "n_images": a.n_images,
            "sequences": a.sequences,
            "training_panels": n_panels,
            "tag_drop": a.tag_drop,
            "later_panels_kept_tag_share": kept,
            "m": a.m,
            "eval_seed": a.eval_seed,
            "eval_prompt_overlap_with_training_captions": overlap,
            "steps": cfg.sample.steps,
            "guidance_scale": cfg.sample.guidance_scale,
            "sampler": cfg.sample.sampler,
            "resolution": cfg.data.resolution,
            "panel_context": cfg.train.panel_context,
            "temporal_weight": cfg.losses.temporal_weight,
        },
        "chance": {"hair_color": 1 / len(HAIR_COLORS), "eye_color": 1 / len(EYE_COLORS)},
        "data_s": round(data_s, 1),
        "train": train_meta,
        "real_eval_panels": real_reference(seqs, Path("eval_sequences"), cfg.data.resolution, weights),
        "models": {},
    }
    paths = {"model": model_path}
    last = train_meta.get("last_model_path")
    if last and Path(last).is_file() and Path(last).resolve() != model_path.resolve():
        if read_model_file(last).epoch != read_model_file(model_path).epoch:
            paths["last"] = Path(last)  # the monitor kept an earlier epoch as the model: score both
    for name, path in paths.items():
        pipe = Pipeline.from_file(path, torch.device("cpu"))
        res = evaluate(pipe, seqs, cfg, seed=1000, weights=weights)
        res["epoch"] = read_model_file(path).epoch
        res["gate_tanh"] = gate_value(pipe)
        res["memory_signal"] = memory_signal(pipe, seqs, Path("eval_sequences"), cfg.data.resolution)
        for arm in ("memory", "no_memory"):
            res[arm] = {k: v for k, v in res[arm].items() if not k.startswith("_")} | {
                "measured": res[arm]["_measured"]
            }
        report["models"][name] = res
        print_table(name, res, report)
    for v in a.probe_gate:
        if not -1.0 < v < 1.0:
            ap.error(f"--probe_gate values must be in (-1, 1), got {v}")
        pipe = Pipeline.from_file(model_path, torch.device("cpu"))
        with torch.no_grad():
            pipe.model.stage("moe").experts.memory_gate.fill_(math.atanh(v))
        res = evaluate(pipe, seqs, cfg, seed=1000, weights=weights)
        res["epoch"] = read_model_file(model_path).epoch
        res["gate_tanh"] = gate_value(pipe)
        res["memory_signal"] = memory_signal(pipe, seqs, Path("eval_sequences"), cfg.data.resolution)
        for arm in ("memory", "no_memory"):
            res[arm] = {k: v for k, v in res[arm].items() if not k.startswith("_")}
        report.setdefault("probe_gate", {})[str(v)] = res
        print_table(f"probe: model with tanh(gate) forced to {v}", res, report)
    report["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(),
        "threads_used": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_end": os.getloadavg(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


def print_table(name: str, res: dict, report: dict) -> None:
    real = report["real_eval_panels"]
    print(
        f"\n{name} (epoch {res['epoch']}), gate tanh = {res['gate_tanh']}, panel 1 identical: {res['panel1_identical']}"
    )
    print(f"{'':24}{'memory':>10}{'no memory':>11}{'real':>8}{'chance':>8}")
    rows = [
        ("panel 1 hair", "panel1", "hair_color"),
        ("panel 1 eyes", "panel1", "eye_color"),
        ("panels 2-3 hair", "later", "hair_color"),
        ("panels 2-3 eyes", "later", "eye_color"),
        ("2-3 hair = panel 1's", "later_vs_panel1", "hair_color"),
        ("2-3 eyes = panel 1's", "later_vs_panel1", "eye_color"),
    ]
    for label, group, a in rows:
        ch = report["chance"][a] if group != "later_vs_panel1" else float("nan")
        print(
            f"{label:24}{res['memory'][group][a]:10.3f}{res['no_memory'][group][a]:11.3f}"
            f"{real[group][a]:8.3f}{ch:8.3f}"
        )
    print(
        f"{'temporal (lower=better)':24}{res['memory']['temporal']:10.4f}{res['no_memory']['temporal']:11.4f}"
        f"{real['temporal']:8.4f}   unrelated {res['no_memory']['temporal_unrelated']:.4f}"
    )
    print(f"mean |memory - no memory| on panels 2-3: {res['mean_abs_pixel_diff_later']:.3f} uint8 levels")
    sig = ", ".join(f"{k} {v:.1e}" for k, v in res["memory_signal"].items())
    print(f"relative change from the memory (panel 2 prompts, real panel 1): {sig}")
    print(f"paired: {json.dumps(res['paired'])}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
