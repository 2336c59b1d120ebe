"""The model card: ``<model>.md`` beside every model file training writes, for a person to read.

It says what the model is (architecture size, resolution, conditioning, base model when fine-tuned), what
it was trained on (folder, image count, caption coverage, top tags, the repeat / ``multiply.txt`` weight of
each subfolder), how (the settings that change the result, time, hardware), how good the chosen step was
(the best-step score and its metric), and shows the run's newest sample grid, copied beside the card as
``<model>.samples.png``. Everything comes from the model file's own metadata, so a card can be rebuilt
from any model file (``write_model_card``). Both files are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moas.inference.model_file import ModelFile, model_file_path, write_model_file
from moas.io import atomic_write_bytes, link_with_sidecar, short_hash

# (section, key, label): the resolved settings a reader needs to reproduce or compare a model.
SETTINGS = (
    ("profile", None, "profile"),
    ("data", "resolution", "resolution (px)"),
    ("brain", "conditioning", "conditioning"),
    ("model", "block_channels", "U-Net channels"),
    ("train", "epochs", "epochs"),
    ("train", "batch_size", "batch size"),
    ("train", "grad_accum_steps", "gradient accumulation"),
    ("train", "lr", "learning rate"),
    ("train", "ema_decay", "EMA decay"),
    ("train", "mixed_precision", "mixed precision"),
    ("diffusion", "prediction_type", "prediction"),
    ("diffusion", "beta_schedule", "noise schedule"),
    ("diffusion", "min_snr_gamma", "Min-SNR γ"),
    ("diffusion", "cond_dropout", "condition dropout"),
    ("data", "shuffle_tags", "tag shuffling"),
    ("data", "tag_dropout", "tag dropout"),
    ("sample", "sampler", "default sampler"),
    ("sample", "steps", "default steps"),
    ("sample", "guidance_scale", "default guidance scale"),
)


def card_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_name(p.stem + ".md")


def grid_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_name(p.stem + ".samples.png")


def save_model(path: str | Path, mf: ModelFile) -> Path:
    """Write the model file and its card; returns the model file's path."""
    written = write_model_file(path, mf)
    write_model_card(written, mf)
    return written


def link_model(path: str | Path, existing: str | Path, mf: ModelFile) -> Path:
    """``path`` as a second name of the model file ``existing`` (which holds ``mf``'s weights), with its
    own card: a hard link where the file system has them, else a copy."""
    target = model_file_path(path)
    link_with_sidecar(model_file_path(existing), target)
    write_model_card(target, mf)
    return target


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def _identity(model_path: Path, mf: ModelFile) -> list[str]:
    params = sum(w.numel() for w in mf.weights.values()) / 1e6
    args = mf.model_args
    conditioning = (
        "text + brain (14 experts)" if args.get("brain", {}).get("conditioning") == "moas" else "text"
    )
    base = mf.provenance.get("base_model")
    origin = (
        f"fine-tuned from `{base['path']}` (hash {base.get('hash') or 'unknown'})"
        if base
        else "trained from random weights"
    )
    return [
        f"# {model_path.stem}",
        "",
        f"A moas text-to-image model: {params:.1f}M generator parameters, {args.get('resolution')} px, "
        f"{conditioning} conditioning, {origin}. File `{model_path.name}`, hash {short_hash(model_path)}, "
        f"text encoder `{mf.text_encoder}`" + (", with a trained enhancer" if mf.enhancer_args else "") + ".",
    ]


def _data(data: dict[str, Any]) -> list[str]:
    if not data:
        return ["## Data", "", "Not recorded in this file."]
    lines = [
        "## Data",
        "",
        f"- folder: `{data['folder']}`",
        f"- training images: {data['images']}"
        + (f" ({data['held_out']} more held out for validation)" if data.get("held_out") else ""),
        f"- captioned: {data['captioned']} of {data['images']} ({100 * data['caption_coverage']:.0f} %)",
    ]
    if data.get("top_tags"):
        lines.append("- top tags (images): " + ", ".join(f"{t} ({n})" for t, n in data["top_tags"]))
    folders = data.get("folders") or {}
    if len(folders) > 1 or any(f["weight"] != 1 for f in folders.values()):
        lines += ["", "| subfolder | images | weight (repeats × multiply.txt) |", "|---|---:|---:|"]
        lines += [f"| `{k}` | {f['images']} | {f['weight']:g} |" for k, f in folders.items()]
    return lines


def _evaluator(prov: dict) -> list[str]:
    """The folder evaluator's own quality, when the run had one: its numbers mean little when unreliable."""
    if prov.get("evaluator_reliable") is None:
        return []
    f1 = prov.get("evaluator_f1")
    own = f"its tag model's held-out F1 {f1:.3f}" if f1 is not None else "its tag model"
    if prov["evaluator_reliable"]:
        return [f"- folder evaluator: reliable ({own})"]
    return [f"- folder evaluator: **unreliable** on this folder ({own}); the folder score was not used"]


def _training(mf: ModelFile) -> list[str]:
    prov = mf.provenance
    score, metric = prov.get("score"), prov.get("metric")
    chosen = (
        f"best-step selection: {metric} {score:.4f} at epoch {prov.get('epoch')}"
        if score is not None
        else "the last weights of the run (no best-step score)"
    )
    return [
        "## Training",
        "",
        f"- {prov.get('epoch', '?')} epochs, {prov.get('global_step', '?')} optimizer steps, "
        f"{_duration(prov.get('train_seconds'))} of training on {prov.get('hardware') or 'unrecorded hardware'}",
        f"- weights: the EMA average; {chosen}",
        *_evaluator(prov),
        f"- seed {prov.get('seed')}, moas {prov.get('moas_version')}, written {prov.get('created')}",
        f"- run folder: `{prov.get('run_dir')}` (TensorBoard: `tensorboard --logdir {prov.get('run_dir')}`)",
    ]


def _settings(config: dict[str, Any]) -> list[str]:
    lines = ["## Settings", "", "| setting | value |", "|---|---|"]
    for section, key, label in SETTINGS:
        value = config.get(section) if key is None else (config.get(section) or {}).get(key)
        if value is not None:
            lines.append(f"| {label} | `{value}` |")
    return lines


def card_text(model_path: str | Path, mf: ModelFile, grid: Path | None) -> str:
    model_path = Path(model_path)
    top = [t for t, _ in (mf.provenance.get("data") or {}).get("top_tags", [])[:4]]
    prompt = ", ".join(top) or "1girl, red hair, forest"
    lines = _identity(model_path, mf) + [""] + _data(mf.provenance.get("data") or {}) + [""]
    lines += _training(mf) + [""] + _settings(mf.config) + ["", "## Samples", ""]
    if grid is not None:
        lines.append(f"![The run's sample grid]({grid.name})")
    else:
        lines.append("The run wrote no sample grid.")
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f'moas generate --model {model_path} --prompt "{prompt}" --output result.png',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(model_path: str | Path, mf: ModelFile) -> Path:
    """``<model>.md`` (and ``<model>.samples.png`` when the run has a sample grid) beside ``model_path``."""
    grid_src = mf.provenance.get("sample_grid")
    grid = None
    if grid_src and Path(grid_src).is_file():
        grid = grid_path(model_path)
        atomic_write_bytes(grid, Path(grid_src).read_bytes())
    path = card_path(model_path)
    atomic_write_bytes(path, card_text(model_path, mf, grid).encode())
    return path
