"""Crash-safe files: atomic writes, checksums and JSON sidecars. The bottom layer (imports nothing of moas).

An atomic write goes to a temp file in the target's directory (``.<name>.tmp-<pid>-<rand>``), is fsynced,
renamed over the target (``os.replace``) and the directory is fsynced, so readers see the old file or the
complete new one. A file that matters (a checkpoint, a model file) also gets a *sidecar* ``<file>.json``
with its size and SHA-256 plus caller metadata, written last: a file counts as complete only when its
sidecar exists and matches. A crash at any moment leaves the previous complete file or the new complete
one, plus at most a stray temp file that :func:`clean_stray_temp_files` removes once its writer is dead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

SIDECAR_RESERVED = frozenset({"format", "sha256", "size"})
_TMP_RE = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[0-9a-f]+$")
_CHUNK = 1 << 20
# Called with every atomic write's temp file complete but not yet renamed: the seam through which the
# fault-injection tests hold a save open to kill it (moas.train.faults). None in normal use.
_before_rename: Callable[[], None] | None = None


def set_before_rename_hook(hook: Callable[[], None] | None) -> None:
    global _before_rename
    _before_rename = hook


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
    """Return the JSON sidecar path for a file (``x.pt`` -> ``x.pt.json``)."""
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
            if _before_rename is not None:
                _before_rename()
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


def _restore_sidecar(target: Path, side: Path, old_sidecar: bytes) -> None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads(old_sidecar)
        if target.stat().st_size == record["size"] and file_sha256(target) == record["sha256"]:
            atomic_write_bytes(side, old_sidecar)


class _HashingWriter:
    """A file's ``write`` that also counts and hashes what passes through it: the sidecar's size and SHA-256
    come without holding the data in memory or reading the file back."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_with_sidecar(
    target: Path, data: bytes | memoryview | Callable[[IO[bytes]], None], fmt: str, meta: dict[str, Any]
) -> None:
    """Write ``data`` atomically to ``target``, then its sidecar (format, size, SHA-256, ``meta``).

    ``data`` may be a function that writes the file (``torch.save`` into it): it streams to the temp file
    and is hashed on the way, so a multi-GB checkpoint is never assembled in memory.
    Raises OSError when the file cannot be written; the previous file and its sidecar are then kept.
    """
    side = sidecar_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        old_sidecar = side.read_bytes()
    except OSError:
        old_sidecar = None
    try:
        # When overwriting (e.g. best_model) the old sidecar is dropped just before the rename, after the
        # slow write: a kill in that short window leaves a complete but unrecorded file rather than one
        # whose stale sidecar makes it look corrupt.
        with atomic_open(target, before_replace=lambda: side.unlink(missing_ok=True)) as f:
            out = _HashingWriter(f)
            data(out) if callable(data) else out.write(data)
    except BaseException:
        # The rename failed (e.g. disk full): put the old sidecar back if it still matches.
        if old_sidecar is not None and not side.exists():
            _restore_sidecar(target, side, old_sidecar)
        raise
    record = {"format": fmt, "sha256": out.sha.hexdigest(), "size": out.size, **meta}
    # Written last: its presence is what marks the file complete.
    atomic_write_bytes(side, json.dumps(record, indent=2, sort_keys=True).encode("utf-8"))


def link_with_sidecar(src: Path, target: Path) -> None:
    """Make ``target`` another name of ``src`` with the same sidecar: a hard link (no second copy on disk),
    else a copy; either way it replaces ``target`` atomically, and the sidecar is written last."""
    record = sidecar_path(src).read_bytes()
    side = sidecar_path(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network and FAT file systems)
            shutil.copyfile(src, tmp)
        side.unlink(missing_ok=True)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    atomic_write_bytes(side, record)


def read_sidecar(path: str | os.PathLike[str], fmt: str | tuple[str, ...]) -> dict[str, Any] | None:
    """Return the parsed sidecar of a file, or None if it is missing, of another format or not valid."""
    side = sidecar_path(path)
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    formats = (fmt,) if isinstance(fmt, str) else fmt
    if not isinstance(record, dict) or record.get("format") not in formats:
        return None
    if not isinstance(record.get("sha256"), str) or type(record.get("size")) is not int:
        return None
    return record


def matches_sidecar(path: str | os.PathLike[str], record: dict[str, Any]) -> bool:
    """True if the file exists and its size and SHA-256 are the ones ``record`` holds."""
    p = Path(path)
    try:
        return p.is_file() and p.stat().st_size == record["size"] and file_sha256(p) == record["sha256"]
    except OSError:
        return False


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
