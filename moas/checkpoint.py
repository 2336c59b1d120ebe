"""The checkpoint file format: torch files of tensors and plain values, with a checksum sidecar.

A checkpoint is two files: the data file (``epoch_0040.pt``, written with ``torch.save``) and its JSON
sidecar (``epoch_0040.pt.json``: size, SHA-256 and training meta such as epoch, global_step, kind), both
written atomically by :mod:`moas.io`, the sidecar last. Old ``.pt`` model files of earlier releases use the
same format.

Loading always uses ``torch.load(..., weights_only=True)``; nothing here ever unpickles arbitrary
objects. Host memory stays near one copy of the state: a save streams ``torch.save`` into the temp file
(hashed on the way), and a load memory-maps the verified file (a private mapping: changing a loaded
tensor never changes the file). To keep that possible, :func:`save_checkpoint` only accepts tensors and plain Python values.
:func:`rewrite_checkpoint` shrinks a checkpoint in place (the training run's old ones), reading it
memory-mapped.

Sidecar rules when loading (``verify=True``): sidecar present and matching -> load; present but
mismatching or unreadable -> :class:`~moas.errors.CheckpointError`; absent (e.g. a model file copied
without its ``.json``) -> load anyway, with a logged warning, provided the file is a readable moas
checkpoint. ``verify=False`` skips the sidecar entirely.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moas.errors import CheckpointError
from moas.io import SIDECAR_RESERVED, matches_sidecar, read_sidecar, sidecar_path, write_with_sidecar

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "moas-checkpoint-v1"


_PLAIN_LEAVES = (str, int, float, bool, type(None), torch.dtype, torch.device)


def _check_plain(obj: Any, where: str, active: set[int]) -> None:
    """Raise TypeError unless ``obj`` is made only of tensors and plain values loadable with
    ``weights_only=True`` (so the checkpoint can always be loaded safely later)."""
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        if kind not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"checkpoint state {where} is a tensor subclass {kind.__qualname__}")
        return
    if kind in _PLAIN_LEAVES:
        return
    # Exact container types only: subclasses (namedtuples, custom dicts) would be refused by the
    # weights-only unpickler at load time. OrderedDict (state_dict()) and torch.Size are fine.
    if kind in (dict, OrderedDict, list, tuple, torch.Size):
        if id(obj) in active:
            raise TypeError(f"checkpoint state {where} contains a reference cycle")
        active.add(id(obj))
        if isinstance(obj, dict):
            for key, value in obj.items():
                if type(key) not in (str, int, float, bool, type(None)):
                    raise TypeError(f"checkpoint state {where} has a non-plain key {key!r}")
                _check_plain(value, f"{where}[{key!r}]", active)
        else:
            for i, value in enumerate(obj):
                _check_plain(value, f"{where}[{i}]", active)
        active.discard(id(obj))
        return
    raise TypeError(
        f"checkpoint state {where} is a {kind.__module__}.{kind.__qualname__}; only tensors and plain "
        "Python values (dict/list/tuple/str/int/float/bool/None) can be saved"
    )


def validate_state(state: dict[str, Any]) -> None:
    """Raise TypeError naming the first key path in ``state`` that is not a tensor or plain value."""
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__qualname__}")
    _check_plain(state, "state", set())


def _check_savable(state: dict[str, Any], meta: dict[str, Any]) -> None:
    validate_state(state)
    clash = SIDECAR_RESERVED & meta.keys()
    if clash:
        raise ValueError(f"checkpoint meta may not set reserved keys {sorted(clash)}")
    try:  # checked before the (possibly slow) serialisation of the state
        json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint meta is not JSON-serialisable: {exc}") from exc


def _write(target: Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    # torch.save streams into the temp file (hashed on the way): the checkpoint is never assembled in host
    # memory, and a CUDA tensor is copied to the host one storage at a time.
    def write(f) -> None:
        torch.save({**state, "moas_format": CHECKPOINT_FORMAT}, f)

    try:
        write_with_sidecar(target, write, CHECKPOINT_FORMAT, meta)
    except OSError as exc:
        raise CheckpointError(f"Could not write checkpoint {target}: {exc.strerror or exc}.") from exc
    return target


def save_checkpoint(
    path: str | os.PathLike[str], state: dict[str, Any], meta: dict[str, Any] | None = None
) -> Path:
    """Atomically save ``state`` to ``path`` and then write its sidecar, which marks it complete.

    ``state`` is not modified; the saved copy gets ``moas_format`` added. ``meta`` (epoch,
    global_step, kind, ...) goes into the JSON sidecar and must be JSON-serialisable.
    Raises TypeError for unsavable values (a bug) and CheckpointError when the file cannot be written.
    """
    target = Path(path)
    meta = dict(meta or {})
    _check_savable(state, meta)
    if target.is_dir():
        raise CheckpointError(f"Cannot save a checkpoint to {target} because it is a directory.")
    return _write(target, state, meta)


def rewrite_checkpoint(
    path: str | os.PathLike[str],
    reduce: Callable[[dict[str, Any]], dict[str, Any]],
    meta: dict[str, Any],
) -> Path:
    """Replace a verified checkpoint by ``reduce(its contents)``, atomically and with a new sidecar.

    For shrinking old checkpoints (dropping the optimizer state, keeping bf16 weights): the file is read
    memory-mapped and what ``reduce`` keeps streams into the new file (POSIX keeps the mapped old file
    readable until it is closed). Raises CheckpointError when the file does not verify or cannot be read or
    written.
    """
    target = Path(path)
    state = load_checkpoint_mapped(target)
    kept = reduce(state)
    del state
    meta = dict(meta)
    _check_savable(kept, meta)
    return _write(target, kept, meta)


def checkpoint_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checkpoint's sidecar record (size, SHA-256, epoch, global_step, kind…), or None."""
    return read_sidecar(path, CHECKPOINT_FORMAT)


def verify_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if the file and its sidecar exist and the file's size and SHA-256 match the sidecar."""
    record = read_sidecar(path, CHECKPOINT_FORMAT)
    return record is not None and matches_sidecar(path, record)


def _describe_load_failure(path: Path, data: bytes, exc: Exception) -> str:
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
        return f"{path} is not a moas checkpoint (it contains objects that cannot be loaded safely)."
    # torch.save writes a zip archive; very old files are a raw pickle stream (protocol 2+ header).
    if not (data.startswith(b"PK\x03\x04") or data[:1] == b"\x80"):
        return f"{path} is not a PyTorch model file."
    return f"{path} is truncated or corrupt and cannot be read."


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu", verify: bool = True
) -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save_checkpoint` (weights-only, never arbitrary pickles).

    With ``verify=True`` a present sidecar must match the file (else CheckpointError); a missing
    sidecar only logs a warning. Every user-caused failure raises CheckpointError with one sentence.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"No model file at {p}.")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory, not a model file.")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"Could not read model file {p}: {exc.strerror or exc}.") from exc
    if not size:
        raise CheckpointError(
            f"Model file {p} is empty (0 bytes), probably from an interrupted copy or save."
        )
    if verify:
        _verify(p)
    try:
        # Memory-mapped: the tensors are read from the file's pages as they are used, never from a second
        # copy of the whole file in memory. Files of the old (pre-zip) torch format cannot be mapped.
        state = torch.load(p, map_location=map_location, weights_only=True, mmap=_is_zip(p))
    except MemoryError:
        raise
    except Exception as exc:  # torch raises many types (RuntimeError, EOFError, UnpicklingError, ...)
        raise CheckpointError(_describe_load_failure(p, _head(p), exc)) from exc
    return _check_format(state, p)


def _head(p: Path) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def _is_zip(p: Path) -> bool:
    return _head(p) == b"PK\x03\x04"


def _verify(p: Path) -> None:
    """A present sidecar must match the file (hashed in chunks); a missing one is only a warning."""
    side = sidecar_path(p)
    if not side.exists():
        logger.warning(
            "%s has no %s record, so its integrity cannot be checked; loading anyway.", p, side.name
        )
        return
    record = read_sidecar(p, CHECKPOINT_FORMAT)
    if record is None:
        raise CheckpointError(
            f"Checkpoint {p} is incomplete or corrupt (its record {side.name} is unreadable)."
        )
    if not matches_sidecar(p, record):
        raise CheckpointError(
            f"Checkpoint {p} is incomplete or corrupt (checksum mismatch against {side.name}); "
            "re-copy it or use another checkpoint."
        )


def _check_format(state: Any, p: Path) -> dict[str, Any]:
    if not isinstance(state, dict) or "moas_format" not in state:
        raise CheckpointError(f"{p} is not a moas checkpoint (it lacks the moas_format marker).")
    if state["moas_format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{p} uses checkpoint format {state['moas_format']!r}, which this version of moas cannot read."
        )
    return state


def load_checkpoint_mapped(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint whose sidecar matches it (memory-mapped, weights-only, on the CPU, as
    :func:`load_checkpoint` does); a missing or mismatching sidecar is a CheckpointError."""
    p = Path(path)
    record = read_sidecar(p, CHECKPOINT_FORMAT)
    if record is None or not matches_sidecar(p, record):
        raise CheckpointError(
            f"Checkpoint {p} is incomplete or corrupt (it does not match its record {sidecar_path(p).name})."
        )
    return load_checkpoint(p, verify=False)


# --- file names: every checkpoint name a run writes, and the patterns that find them again ----------------
# (kept compatible with the original system's layout)
EPOCH_PATTERN, STEP_PATTERN = "epoch_*.pt", "checkpoint_*.pt"
REGULAR_PATTERNS = (EPOCH_PATTERN, STEP_PATTERN)
EMERGENCY_PATTERNS = ("emergency_epoch_*.pt", "emergency_oom_epoch_*.pt")  # out of memory, crashes
CHECKPOINT_PATTERNS = (*REGULAR_PATTERNS, *EMERGENCY_PATTERNS, "best_model*.pt")


def epoch_checkpoint_name(epoch: int) -> str:
    """Return the file name for an epoch checkpoint, e.g. ``epoch_0040.pt``."""
    if type(epoch) is not int or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
    return f"epoch_{epoch:04d}.pt"


def step_checkpoint_name(step: int) -> str:
    """Mid-epoch checkpoints (``save_every_steps``, signals, ``max_steps``): ``checkpoint_00000120.pt``."""
    return f"checkpoint_{step:08d}.pt"


def emergency_checkpoint_name(epoch: int, oom: bool = False) -> str:
    """``emergency_epoch_0003.pt`` (``emergency_oom_…`` after out of memory) for the 1-based ``epoch``."""
    return f"emergency{'_oom' if oom else ''}_epoch_{epoch:04d}.pt"
