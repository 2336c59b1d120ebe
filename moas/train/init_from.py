"""``moas train --init_from MODEL``: a new run that starts from a trained model's weights (fine-tuning).

Only the weights come over — the generator's (the model file holds its EMA weights, which become both
the trained and the averaged copy) and the enhancer's when both sides have one. The optimizer, the lr
schedule, the step count and the run folder are new. The architecture and the text encoder must be the
base model's; the resolution may differ (the U-Net is convolutional), so a character can be fine-tuned at
another size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from moas.errors import CheckpointError
from moas.inference.model_file import ModelFile, read_model_file
from moas.io import short_hash
from moas.models.upgrade import upgrade_model_args

log = logging.getLogger(__name__)

# Constructor arguments that may differ between a base model and its fine-tuned run.
FREE_ARGS = ("resolution",)


def read_base_model(path: str | Path) -> ModelFile:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"--init_from {p}: no such model file.")
    return read_model_file(p)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


def architecture_differences(base_args: dict[str, Any], run_args: dict[str, Any]) -> list[str]:
    """``name: base → run`` for every constructor argument that differs (FREE_ARGS excepted)."""
    a = _flat({k: v for k, v in upgrade_model_args(base_args).items() if k not in FREE_ARGS})
    b = _flat({k: v for k, v in run_args.items() if k not in FREE_ARGS})
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def check_compatible(base: ModelFile, path: str | Path, run_args: dict[str, Any]) -> None:
    """One CheckpointError when the run cannot start from ``base`` (the text encoder is checked when it
    loads: the run requires the base model's)."""
    diff = architecture_differences(base.model_args, run_args)
    if diff:
        shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
        raise CheckpointError(
            f"--init_from {path} has another architecture than this run ({shown}); train with the "
            "base model's profile and config (printed by moas inspect --model)."
        )


def load_base_weights(model: torch.nn.Module, base: ModelFile, path: str | Path) -> None:
    try:
        model.load_state_dict(base.weights)
    except RuntimeError:
        raise CheckpointError(f"--init_from {path}: its weights do not fit this run's generator.") from None


def load_base_enhancer(enhancer: torch.nn.Module | None, base: ModelFile) -> bool:
    """The base model's trained enhancer into the run's, when both exist with the same shape."""
    if enhancer is None or base.enhancer_weights is None or base.enhancer_args != enhancer.init_args:
        return False
    enhancer.load_state_dict(base.enhancer_weights)
    return True


def base_record(path: str | Path, base: ModelFile | None) -> dict[str, Any]:
    """What the fine-tuned model's files say about their base (``base`` None: a resumed run, which knows
    its base by path, and by hash while the file is still there)."""
    if base is None:
        return {"path": str(path), "hash": short_hash(path) if Path(path).is_file() else None}
    prov = base.provenance
    return {
        "path": str(path),
        "hash": short_hash(path),
        "data_dir": prov.get("data_dir"),
        "epoch": prov.get("epoch"),
        "base_model": prov.get("base_model"),  # a chain of fine-tunes stays readable
    }
