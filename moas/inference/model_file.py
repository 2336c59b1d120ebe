"""Model files for generation: ``.safetensors`` with the arguments and provenance in the metadata.

A model file holds what generation needs and nothing to resume training with:

* tensors ``generator.<key>`` — the generator's EMA weights — ``enhancer.<key>``, the trained
  QualityEnhancer, and ``sr.<key>``, the super-resolution stage's EMA weights, when the run trained them;
* metadata (JSON strings, as safetensors wants): ``format`` (``moas-model-v1``), ``model_args`` (the
  generator's constructor arguments: enough to rebuild it), ``enhancer_args``, ``sr_args``, ``config`` (the resolved
  training config), ``text_encoder`` (the encoder identity the weights were trained with), ``style_db``
  when styles were trained, and ``provenance`` (moas version, epoch, step, training seconds, data and run
  folders, seed, creation time).

It is written atomically with a checksum sidecar (:mod:`moas.io`), and any safetensors reader opens it
(``safetensors.safe_open``). :func:`read_model_file` also reads the ``.pt`` model files of earlier
releases and training checkpoints (``moas.checkpoint``: tensors only, ``weights_only=True``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from moas.checkpoint import load_checkpoint
from moas.errors import CheckpointError
from moas.io import matches_sidecar, read_sidecar, sidecar_path, write_with_sidecar
from moas.models.upgrade import upgrade_model_args

log = logging.getLogger(__name__)

MODEL_FORMAT = "moas-model-v1"
SUFFIX = ".safetensors"
_JSON_KEYS = ("model_args", "enhancer_args", "sr_args", "config", "style_db", "provenance")


def moas_version() -> str:
    try:
        return version("moas")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


@dataclass
class ModelFile:
    """The contents of a model file (see the module docstring)."""

    model_args: dict[str, Any]
    weights: dict[str, torch.Tensor]  # the generator's (EMA) state dict
    config: dict[str, Any]
    text_encoder: str
    enhancer_args: dict[str, Any] | None = None
    enhancer_weights: dict[str, torch.Tensor] | None = None
    sr_args: dict[str, Any] | None = None  # the super-resolution stage's constructor arguments
    sr_weights: dict[str, torch.Tensor] | None = None  # its EMA weights
    style_db: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def epoch(self) -> int | None:
        return self.provenance.get("epoch")


def model_file_path(path: str | os.PathLike[str]) -> Path:
    """Where a model file for ``path`` is written: always a ``.safetensors`` file."""
    p = Path(path)
    return p if p.suffix == SUFFIX else p.with_suffix(SUFFIX)


def write_model_file(path: str | os.PathLike[str], mf: ModelFile) -> Path:
    """Write ``mf`` to ``path`` (atomically, then its sidecar); returns the path written."""
    target = model_file_path(path)
    tensors = {f"generator.{k}": v.detach().cpu().contiguous() for k, v in mf.weights.items()}
    if mf.enhancer_weights is not None:
        tensors |= {f"enhancer.{k}": v.detach().cpu().contiguous() for k, v in mf.enhancer_weights.items()}
    if mf.sr_weights is not None:
        tensors |= {f"sr.{k}": v.detach().cpu().contiguous() for k, v in mf.sr_weights.items()}
    meta = {"format": MODEL_FORMAT, "text_encoder": mf.text_encoder}
    for key in _JSON_KEYS:
        value = getattr(mf, key)
        if value is not None:
            meta[key] = json.dumps(value, sort_keys=True)
    data = safetensors_bytes(tensors, metadata=meta)
    record = {k: mf.provenance[k] for k in ("epoch", "global_step") if k in mf.provenance}
    try:
        write_with_sidecar(target, data, MODEL_FORMAT, {**record, "kind": "model"})
    except OSError as exc:
        raise CheckpointError(f"Could not write model file {target}: {exc.strerror or exc}.") from exc
    return target


def verify_model_file(path: str | os.PathLike[str]) -> bool:
    """True if the model file and its sidecar exist and the file's size and SHA-256 match it."""
    record = read_sidecar(path, MODEL_FORMAT)
    return record is not None and matches_sidecar(path, record)


def read_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """A ``.safetensors`` model file, a ``.pt`` model file of an earlier release, or a training checkpoint.

    Every user-caused failure is a CheckpointError with one sentence."""
    p = Path(path)
    if p.suffix == SUFFIX:
        return _read_safetensors(p)
    return from_checkpoint_state(load_checkpoint(p, map_location="cpu"), p)


def _read_safetensors(p: Path) -> ModelFile:
    if not p.is_file():
        raise CheckpointError(f"No model file at {p}." if not p.exists() else f"{p} is not a model file.")
    record = read_sidecar(p, MODEL_FORMAT)
    if record is not None and not matches_sidecar(p, record):
        raise CheckpointError(
            f"Model file {p} is incomplete or corrupt (checksum mismatch against {sidecar_path(p).name}); "
            "re-copy it or use another model file."
        )
    if record is None:
        log.warning("%s has no valid %s record, so its integrity cannot be checked.", p, sidecar_path(p).name)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p} is not a readable safetensors model file ({exc}).") from None
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{p} is a safetensors file but not a moas model (no {MODEL_FORMAT} metadata).")
    try:
        values = {k: json.loads(meta[k]) for k in _JSON_KEYS if k in meta}
        return ModelFile(
            model_args=upgrade_model_args(values["model_args"]),
            weights=_prefixed(tensors, "generator."),
            config=values["config"],
            text_encoder=meta["text_encoder"],
            enhancer_args=values.get("enhancer_args"),
            enhancer_weights=_prefixed(tensors, "enhancer.") if "enhancer_args" in values else None,
            sr_args=values.get("sr_args"),
            sr_weights=_prefixed(tensors, "sr.") if "sr_args" in values else None,
            style_db=values.get("style_db"),
            provenance=values.get("provenance", {}),
        )
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(f"{p} has moas metadata that this version cannot read.") from None


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def from_checkpoint_state(state: dict[str, Any], path: object) -> ModelFile:
    """The model-file view of a loaded ``.pt`` file: an earlier release's model file (EMA weights, its
    arguments and config) or a training checkpoint (whose enhancer sits with the trainer's state)."""
    try:
        args = upgrade_model_args(state["model_args"])
        weights = state["ema"]["model"] if "ema" in state else state["model"]
        cfg, encoder_id = state["config"], state["text_encoder"]
    except (KeyError, TypeError):
        raise CheckpointError(
            f"{path} is a moas file but not a model (no generator weights in it)."
        ) from None
    enhancer = state.get("enhancer")
    domain = state.get("domain") or {}
    if enhancer is None and "enhancer" in domain:
        e = cfg.get("enhance", {})
        args_e = {k: e[k] for k in ("width", "sr_channels", "sr_blocks") if k in e}
        enhancer = {"args": args_e, "weights": domain["enhancer"]}
    provenance = {k: state[k] for k in ("epoch", "global_step", "train_seconds") if k in state}
    sr = state.get("sr") or {}
    return ModelFile(
        model_args=args,
        weights=weights,
        config=cfg,
        text_encoder=encoder_id,
        enhancer_args=enhancer["args"] if enhancer else None,
        enhancer_weights=enhancer["weights"] if enhancer else None,
        sr_args=sr.get("args"),
        sr_weights=sr["ema"]["model"] if "ema" in sr else None,
        style_db=state.get("style_db"),
        provenance=provenance,
    )


def provenance(
    epoch: int, global_step: int, train_seconds: float, data_dir: str, run_dir: str, seed: int
) -> dict[str, Any]:
    return {
        "moas_version": moas_version(),
        "epoch": epoch,
        "global_step": global_step,
        "train_seconds": round(train_seconds, 1),
        "data_dir": data_dir,
        "run_dir": run_dir,
        "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def load_generator(mf: ModelFile, path: object):
    """The generator of a model file, with its weights; one CheckpointError when they do not fit."""
    from moas.models.generator import MoasGenerator

    try:
        model = MoasGenerator(**mf.model_args)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path} was written by an incompatible version of moas.") from None
    try:
        model.load_state_dict(mf.weights)
    except RuntimeError:
        raise CheckpointError(
            f"{path} does not match this version of moas (its weights do not fit the model)."
        ) from None
    return model
