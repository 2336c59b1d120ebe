"""Which checkpoints exist, which is newest, and which to delete or reduce: the training run's rotation.

Only complete checkpoints count (a sidecar that matches the file, :mod:`moas.checkpoint`); stray temp files
of dead writers are removed on the way. A checkpoint's sidecar says what it holds (``contents``): ``full``
(everything, resumable), ``thinned`` (no optimizer states) or ``ema_bf16`` (the EMA generator in bf16 and
the enhancer: a weights-only checkpoint to generate from, evaluate or fine-tune). Only full ones resume.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from moas.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_PATTERNS,
    EMERGENCY_PATTERNS,
    EPOCH_PATTERN,
    REGULAR_PATTERNS,
    rewrite_checkpoint,
    verify_checkpoint,
)
from moas.errors import CheckpointError
from moas.io import SIDECAR_RESERVED, clean_stray_temp_files, read_sidecar, sidecar_path

logger = logging.getLogger(__name__)

CONTENTS = ("ema_bf16", "thinned", "full")  # what a checkpoint holds, smallest first
# What a weights-only checkpoint keeps beside the weights: what generation and `moas inspect` read.
WEIGHTS_ONLY_KEYS = (
    "kind",
    "epoch",
    "batch_in_epoch",
    "global_step",
    "train_seconds",
    "config",
    "model_args",
    "text_encoder",
    "run_dir",
)
SIDE_OPTIMIZERS = ("disc_opt", "enh_opt")  # in ``domain``: the discriminator's and enhancer's AdamW


def contents_of(record: dict[str, Any]) -> str:
    """What a checkpoint holds, from its sidecar (files thinned by earlier releases say only resumable)."""
    contents = record.get("contents")
    if contents in CONTENTS:
        return contents
    return "thinned" if record.get("resumable") is False else "full"


def _order_key(path: Path, record: dict[str, Any]) -> tuple[int, int, float]:
    def as_int(value: Any) -> int:
        return value if type(value) is int else -1

    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = 0.0
    return (as_int(record.get("global_step")), as_int(record.get("epoch")), mtime)


def _newest_first(items: list[tuple[Path, dict[str, Any]]]) -> list[tuple[Path, dict[str, Any]]]:
    return sorted(items, key=lambda item: _order_key(*item), reverse=True)


def _recorded_checkpoints(directory: Path, patterns: tuple[str, ...]) -> list[tuple[Path, dict[str, Any]]]:
    """Checkpoints matching ``patterns`` whose sidecar exists and whose size matches it."""
    found: dict[Path, dict[str, Any]] = {}
    for pattern in patterns:
        for p in directory.glob(pattern):
            if p in found or not p.is_file():
                continue
            record = read_sidecar(p, CHECKPOINT_FORMAT)
            if record is None:
                logger.warning(
                    "Ignoring checkpoint %s: it has no valid %s record (incomplete save?).",
                    p,
                    sidecar_path(p).name,
                )
                continue
            try:
                size = p.stat().st_size
            except OSError:  # deleted meanwhile (e.g. by a concurrent rotation)
                continue
            if size != record["size"]:
                logger.warning("Ignoring checkpoint %s: its size does not match its record (corrupt).", p)
                continue
            found[p] = record
    return list(found.items())


def find_latest_checkpoint(
    directory: str | os.PathLike[str],
    resumable_only: bool = True,
    patterns: tuple[str, ...] = CHECKPOINT_PATTERNS,
) -> Path | None:
    """Return the verified checkpoint with the highest global_step (then epoch, then mtime).

    Incomplete or corrupt checkpoints are skipped with a warning; stray temp files from dead
    writers are removed. With ``resumable_only`` (the default), checkpoints reduced by
    :func:`reduce_old_checkpoints` (sidecar ``"resumable": false``: thinned or weights-only) are skipped too.
    ``patterns``: which files count (default: a training run's checkpoints). Returns None if the directory
    is missing or holds no such checkpoint.
    """
    d = Path(directory)
    if not d.is_dir():
        return None
    clean_stray_temp_files(d)
    candidates = _recorded_checkpoints(d, patterns)
    if resumable_only:
        candidates = [(p, r) for p, r in candidates if r.get("resumable") is not False]
    candidates = _newest_first(candidates)
    # Hash only until the newest good one is found: hashing every multi-GB file would be slow.
    for p, _record in candidates:
        if verify_checkpoint(p):
            return p
        logger.warning(
            "Ignoring checkpoint %s: checksum does not match its record (corrupt or incomplete).", p
        )
    return None


def _bf16(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # bf16 keeps float32's range, so the weights stay usable; float64 buffers stay as they are.
    return {k: v.to(torch.bfloat16) if v.dtype == torch.float32 else v for k, v in weights.items()}


def reduced_state(state: dict[str, Any], mode: str) -> dict[str, Any]:
    """What an old checkpoint keeps, marked not resumable: everything but the optimizer states
    (``thinned``), or the EMA generator and super-resolution stage in bf16, the enhancer and what generation
    needs (``ema_bf16``)."""
    if mode == "thinned":
        kept = {k: v for k, v in state.items() if k not in ("optimizer", "moas_format")}
        if isinstance(kept.get("domain"), dict):
            kept["domain"] = {k: v for k, v in kept["domain"].items() if k not in SIDE_OPTIMIZERS}
        if isinstance(kept.get("sr"), dict):
            kept["sr"] = {k: v for k, v in kept["sr"].items() if k != "optimizer"}
    else:
        try:
            ema, args = dict(state["ema"]), state["model_args"]
            weights = ema.pop("model")
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("it holds no EMA generator weights") from None
        ema["model"] = _bf16(weights)
        kept = {k: state[k] for k in WEIGHTS_ONLY_KEYS if k in state} | {"ema": ema, "model_args": args}
        enhancer = (state.get("domain") or {}).get("enhancer")
        if enhancer is not None:
            kept["domain"] = {"enhancer": enhancer}
        sr = state.get("sr")
        if isinstance(sr, dict) and "ema" in sr:  # the super-resolution stage generation uses
            kept["sr"] = {"args": sr["args"], "ema": {"model": _bf16(sr["ema"]["model"])}}
    return {**kept, "resumable": False, "contents": mode}


def reduce_old_checkpoints(directory: str | os.PathLike[str], keep_full: int, mode: str) -> list[Path]:
    """Reduce all but the newest ``keep_full`` full checkpoints to ``mode`` (``thinned`` or ``ema_bf16``;
    ``full`` or ``keep_full`` 0 reduce nothing). Returns the reduced paths.

    The optimizer state (AdamW/AMSGrad: three tensors per weight) is most of a checkpoint's size and only
    needed to resume, which uses the newest checkpoints. Milestones and emergency checkpoints are reduced
    like the others; the newest full epoch/step checkpoint always stays full, so emergency checkpoints
    (written at abnormal moments) never leave a run without an ordinary place to resume from. Each file is
    rewritten atomically (:func:`~moas.checkpoint.rewrite_checkpoint`, read memory-mapped) with its new
    ``contents`` and ``"resumable": false`` in its sidecar, so :func:`find_latest_checkpoint` skips it.
    """
    if keep_full <= 0 or mode == "full":
        return []
    d = Path(directory)
    regular = _recorded_checkpoints(d, REGULAR_PATTERNS)
    emergency = _recorded_checkpoints(d, EMERGENCY_PATTERNS)
    full = _newest_first([(p, r) for p, r in regular + emergency if contents_of(r) == "full"])
    regular_paths = {p for p, _ in regular}
    keep = {p for p, _ in full[:keep_full]}
    keep.update(next(([p] for p, _ in full if p in regular_paths), []))  # the newest full epoch/step one
    reduced = []
    for p, record in _newest_first(regular + emergency):
        if p in keep or CONTENTS.index(contents_of(record)) <= CONTENTS.index(mode):
            continue
        meta = {k: v for k, v in record.items() if k not in SIDECAR_RESERVED}
        try:
            rewrite_checkpoint(
                p, lambda s: reduced_state(s, mode), {**meta, "resumable": False, "contents": mode}
            )
        except CheckpointError as exc:
            logger.warning("Not reducing %s: %s", p, exc)
            continue
        reduced.append(p)
    return reduced


def _delete(p: Path) -> bool:
    try:
        # Sidecar first: if we crash in between, the leftover data file is simply unrecorded.
        sidecar_path(p).unlink(missing_ok=True)
        p.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("Could not delete old checkpoint %s: %s", p, exc)
        return False
    return True


def rotate_emergency_checkpoints(directory: str | os.PathLike[str], keep: int = 2) -> list[Path]:
    """Delete all but the newest ``keep`` ``emergency_*`` checkpoints (written on out of memory and
    crashes); one newer than the newest resumable epoch/step checkpoint is never deleted: it holds the
    run's latest progress. Returns the deleted paths."""
    d = Path(directory)
    if not d.is_dir():
        return []
    regular = _recorded_checkpoints(d, REGULAR_PATTERNS)
    resumable = _newest_first([(p, r) for p, r in regular if r.get("resumable") is not False])
    floor = _order_key(*resumable[0]) if resumable else None
    deleted = []
    for p, record in _newest_first(_recorded_checkpoints(d, EMERGENCY_PATTERNS))[keep:]:
        if floor is not None and _order_key(p, record) <= floor and _delete(p):
            deleted.append(p)
    return deleted


def rotate_checkpoints(
    directory: str | os.PathLike[str],
    keep: int = 30,
    pattern: str = EPOCH_PATTERN,
    protect: set[str] | frozenset[str] = frozenset(),
) -> list[Path]:
    """Delete the oldest complete checkpoints matching ``pattern`` beyond the newest ``keep``.

    Files whose name (or full path) is in ``protect`` are never deleted and do not count toward
    ``keep``; files without a valid sidecar are left alone. Returns the deleted checkpoint paths.
    """
    if type(keep) is not int or keep < 0:
        raise ValueError(f"keep must be a non-negative int, got {keep!r}")
    d = Path(directory)
    if not d.is_dir():
        return []
    candidates = [
        (p, rec)
        for p, rec in _recorded_checkpoints(d, (pattern,))
        if p.name not in protect and str(p) not in protect
    ]
    deleted: list[Path] = []
    for p, _record in _newest_first(candidates)[keep:]:
        if _delete(p):
            deleted.append(p)
    return deleted
