"""Crash-safe checkpoint files.

A checkpoint is two files: the model file (``epoch_0040.pt``, written with ``torch.save``) and a JSON
sidecar next to it (``epoch_0040.pt.json``) holding the file's size and SHA-256 plus training meta
(epoch, global_step, kind). Both are written atomically (temp file in the same directory, fsync,
``os.replace``, fsync of the directory), and the sidecar is written *last*: a checkpoint counts as
complete only when its sidecar exists and matches. A crash at any moment therefore leaves either the
previous complete checkpoint or the new complete one, plus at most a stray ``.<name>.tmp-<pid>-<rand>``
file that :func:`find_latest_checkpoint` ignores and removes once its writer is dead.

Loading always uses ``torch.load(..., weights_only=True)``; nothing here ever unpickles arbitrary
objects. To keep that possible, :func:`save_checkpoint` only accepts tensors and plain Python values.

Sidecar rules when loading (``verify=True``): sidecar present and matching -> load; present but
mismatching or unreadable -> :class:`~moas.errors.CheckpointError`; absent (e.g. a model file copied
without its ``.json``) -> load anyway, with a logged warning, provided the file is a readable moas
checkpoint. ``verify=False`` skips the sidecar entirely.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from moas.errors import CheckpointError
from moas.train.rng import capture_rng_state, nonfinite_tensor, restore_rng_state  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "moas-checkpoint-v1"
# File names the training loop writes (kept compatible with the original system's layout).
CHECKPOINT_PATTERNS = (
    "epoch_*.pt",
    "emergency_epoch_*.pt",
    "emergency_oom_epoch_*.pt",
    "best_model*.pt",
    "checkpoint_*.pt",
)
_SIDECAR_RESERVED = frozenset({"format", "sha256", "size"})
_TMP_RE = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[0-9a-f]+$")
_CHUNK = 1 << 20
# Test hook for the kill-during-save fault tests: seconds to wait with the temp file fully written but not
# yet renamed, so a test can SIGKILL the process mid-save. Zero (no wait) unless the variable is set.
_SAVE_DELAY_S = float(os.environ.get("MOAS_INJECT_SAVE_DELAY", "0") or 0)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks so large models never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def short_hash(path: str | os.PathLike[str]) -> str:
    """Return the first 10 hex characters of the file's SHA-256 (the "model hash" in PNG metadata)."""
    return file_sha256(path)[:10]


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Return the JSON sidecar path for a checkpoint (``x.pt`` -> ``x.pt.json``)."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Some platforms/filesystems (Windows, some network mounts)
    # cannot fsync a directory; atomicity does not depend on it, so failure is tolerated.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], before_replace: Callable[[], None] | None = None
) -> Iterator[IO[bytes]]:
    """Open a binary temp file that replaces ``path`` atomically when the block exits cleanly.

    The temp file lives in the target's directory (so ``os.replace`` is a same-filesystem rename)
    and is named ``.<name>.tmp-<pid>-<rand>``. ``before_replace`` runs after the data is durable
    and right before the rename. On any exception the temp file is removed and the target is
    left untouched.
    """
    target = Path(path)
    directory = target.parent
    tmp = directory / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if _SAVE_DELAY_S:
                time.sleep(_SAVE_DELAY_S)
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one."""
    with atomic_open(path) as f:
        f.write(data)


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


def _read_bytes_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _restore_sidecar(target: Path, side: Path, old_sidecar: bytes) -> None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads(old_sidecar)
        if target.stat().st_size == record["size"] and file_sha256(target) == record["sha256"]:
            atomic_write_bytes(side, old_sidecar)


def _write_checkpoint_files(target: Path, data: memoryview, sidecar: bytes) -> None:
    if target.is_dir():
        raise CheckpointError(f"Cannot save a checkpoint to {target} because it is a directory.")
    side = sidecar_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        old_sidecar = _read_bytes_or_none(side)
        try:
            # When overwriting (e.g. best_model.pt) the old sidecar is dropped just before the
            # rename, after the slow write: a kill in that short window leaves a complete but
            # unrecorded file rather than one whose stale sidecar makes it look corrupt.
            with atomic_open(target, before_replace=lambda: side.unlink(missing_ok=True)) as f:
                f.write(data)
        except BaseException:
            # The rename failed (e.g. disk full): put the old sidecar back if it still matches.
            if old_sidecar is not None and not side.exists():
                _restore_sidecar(target, side, old_sidecar)
            raise
        # Written last: its presence is what marks the checkpoint complete.
        atomic_write_bytes(side, sidecar)
    except OSError as exc:
        raise CheckpointError(f"Could not write checkpoint {target}: {exc.strerror or exc}.") from exc


def save_checkpoint(
    path: str | os.PathLike[str], state: dict[str, Any], meta: dict[str, Any] | None = None
) -> Path:
    """Atomically save ``state`` to ``path`` and then write its sidecar, which marks it complete.

    ``state`` is not modified; the saved copy gets ``moas_format`` added. ``meta`` (epoch,
    global_step, kind, ...) goes into the JSON sidecar and must be JSON-serialisable.
    Raises TypeError for unsavable values (a bug) and CheckpointError when the file cannot be written.
    """
    target = Path(path)
    validate_state(state)
    meta = dict(meta or {})
    clash = _SIDECAR_RESERVED & meta.keys()
    if clash:
        raise ValueError(f"checkpoint meta may not set reserved keys {sorted(clash)}")
    try:  # checked before the (possibly slow) serialisation of the state
        json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint meta is not JSON-serialisable: {exc}") from exc

    buf = io.BytesIO()
    torch.save({**state, "moas_format": CHECKPOINT_FORMAT}, buf)
    # A memoryview of the buffer avoids copying a possibly multi-GB checkpoint once more.
    with buf.getbuffer() as data:
        sidecar = {
            "format": CHECKPOINT_FORMAT,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            **meta,
        }
        sidecar_text = json.dumps(sidecar, indent=2, sort_keys=True)
        _write_checkpoint_files(target, data, sidecar_text.encode("utf-8"))
    return target


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the parsed sidecar of a checkpoint, or None if it is missing or not a valid record."""
    side = sidecar_path(path)
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        return None
    if not isinstance(record.get("sha256"), str) or type(record.get("size")) is not int:
        return None
    return record


def verify_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if the file and its sidecar exist and the file's size and SHA-256 match the sidecar."""
    p = Path(path)
    record = read_sidecar(p)
    if record is None or not p.is_file():
        return False
    try:
        if p.stat().st_size != record["size"]:
            return False
        return file_sha256(p) == record["sha256"]
    except OSError:
        return False


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
        data = p.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"Could not read model file {p}: {exc.strerror or exc}.") from exc
    if not data:
        raise CheckpointError(
            f"Model file {p} is empty (0 bytes), probably from an interrupted copy or save."
        )

    if verify:
        side = sidecar_path(p)
        if side.exists():
            record = read_sidecar(p)
            if record is None:
                raise CheckpointError(
                    f"Checkpoint {p} is incomplete or corrupt (its record {side.name} is unreadable)."
                )
            if record["size"] != len(data) or record["sha256"] != hashlib.sha256(data).hexdigest():
                raise CheckpointError(
                    f"Checkpoint {p} is incomplete or corrupt (checksum mismatch against {side.name}); "
                    "re-copy it or use another checkpoint."
                )
        else:
            logger.warning(
                "%s has no %s record, so its integrity cannot be checked; loading anyway.", p, side.name
            )

    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # torch raises many types (RuntimeError, EOFError, UnpicklingError, ...)
        raise CheckpointError(_describe_load_failure(p, data, exc)) from exc

    if not isinstance(state, dict) or "moas_format" not in state:
        raise CheckpointError(f"{p} is not a moas checkpoint (it lacks the moas_format marker).")
    if state["moas_format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{p} uses checkpoint format {state['moas_format']!r}, which this version of moas cannot read."
        )
    return state


def epoch_checkpoint_name(epoch: int) -> str:
    """Return the file name for an epoch checkpoint, e.g. ``epoch_0040.pt``."""
    if type(epoch) is not int or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
    return f"epoch_{epoch:04d}.pt"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except OSError:
        pass  # exists but belongs to someone else, or cannot tell: treat as alive
    return True


def clean_stray_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>-<rand>`` files whose writing process no longer exists."""
    removed: list[Path] = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for entry in d.iterdir():
        m = _TMP_RE.match(entry.name)
        # A live pid may be a save in progress (or a reused pid): leave those alone.
        if m and entry.is_file() and not _pid_alive(int(m.group("pid"))):
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
                logger.info("Removed stray temporary file %s left by an interrupted save.", entry)
    return removed


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
            record = read_sidecar(p)
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
        meta = {k: v for k, v in record.items() if k not in _SIDECAR_RESERVED}
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
