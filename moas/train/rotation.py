"""Which checkpoints exist, which is newest, and which to delete or thin: the training run's rotation.

Only complete checkpoints count (a sidecar that matches the file, :mod:`moas.checkpoint`); stray temp files
of dead writers are removed on the way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from moas.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint, verify_checkpoint
from moas.errors import CheckpointError
from moas.io import SIDECAR_RESERVED, clean_stray_temp_files, read_sidecar, sidecar_path

logger = logging.getLogger(__name__)

# File names the training loop writes (kept compatible with the original system's layout).
CHECKPOINT_PATTERNS = (
    "epoch_*.pt",
    "emergency_epoch_*.pt",
    "emergency_oom_epoch_*.pt",
    "best_model*.pt",
    "checkpoint_*.pt",
)


def _order_key(path: Path, record: dict[str, Any]) -> tuple[int, int, float]:
    def as_int(value: Any) -> int:
        return value if type(value) is int else -1

    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = 0.0
    return (as_int(record.get("global_step")), as_int(record.get("epoch")), mtime)


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


def find_latest_checkpoint(directory: str | os.PathLike[str], resumable_only: bool = True) -> Path | None:
    """Return the verified checkpoint with the highest global_step (then epoch, then mtime).

    Incomplete or corrupt checkpoints are skipped with a warning; stray temp files from dead
    writers are removed. With ``resumable_only`` (the default), checkpoints whose optimizer state was
    dropped by :func:`thin_optimizer_states` (sidecar ``"resumable": false``) are skipped too.
    Returns None if the directory is missing or holds no such checkpoint.
    """
    d = Path(directory)
    if not d.is_dir():
        return None
    clean_stray_temp_files(d)
    candidates = _recorded_checkpoints(d, CHECKPOINT_PATTERNS)
    if resumable_only:
        candidates = [(p, r) for p, r in candidates if r.get("resumable") is not False]
    candidates.sort(key=lambda item: _order_key(*item), reverse=True)
    # Hash only until the newest good one is found: hashing every multi-GB file would be slow.
    for p, _record in candidates:
        if verify_checkpoint(p):
            return p
        logger.warning(
            "Ignoring checkpoint %s: checksum does not match its record (corrupt or incomplete).", p
        )
    return None


def thin_optimizer_states(
    directory: str | os.PathLike[str],
    keep: int,
    patterns: tuple[str, ...] = ("epoch_*.pt", "checkpoint_*.pt"),
) -> list[Path]:
    """Drop the optimizer state from all but the newest ``keep`` checkpoints (0 = keep it everywhere).

    The optimizer state (AdamW/AMSGrad: three tensors per weight) is most of a checkpoint's size and only
    needed to resume, which uses the newest checkpoints. A thinned checkpoint keeps weights, EMA and all
    other state, is rewritten atomically with ``"resumable": false`` in its sidecar, and is skipped by
    :func:`find_latest_checkpoint`. Returns the thinned paths.
    """
    if keep <= 0:
        return []
    d = Path(directory)
    found = [(p, r) for p, r in _recorded_checkpoints(d, patterns) if r.get("resumable") is not False]
    found.sort(key=lambda item: _order_key(*item), reverse=True)
    thinned = []
    for p, record in found[keep:]:
        try:
            state = load_checkpoint(p)
        except CheckpointError as exc:
            logger.warning("Not thinning %s: %s", p, exc)
            continue
        state.pop("moas_format", None)
        state.pop("optimizer", None)
        state["resumable"] = False
        meta = {k: v for k, v in record.items() if k not in SIDECAR_RESERVED}
        save_checkpoint(p, state, {**meta, "resumable": False})
        thinned.append(p)
    return thinned


def rotate_checkpoints(
    directory: str | os.PathLike[str],
    keep: int = 30,
    pattern: str = "epoch_*.pt",
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
    candidates.sort(key=lambda item: _order_key(*item), reverse=True)
    deleted: list[Path] = []
    for p, _record in candidates[keep:]:
        try:
            # Sidecar first: if we crash in between, the leftover data file is simply unrecorded.
            sidecar_path(p).unlink(missing_ok=True)
            p.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("Could not delete old checkpoint %s: %s", p, exc)
            continue
        deleted.append(p)
    return deleted
