"""The preprocessed-tensor cache (the original's SSDOptimizer): one ``.pt`` file per image.

An entry holds tensors only — ``pixels`` uint8 [3, H, W] at the training size, optionally ``pixels_hr`` uint8
[3, H', W'], the same crop larger for image augmentation to crop from, ``image_embed`` float32
[768], ``style`` float32 [STYLE_DIM], optionally ``text_embed`` float32 [768] (the pooled embedding of the
stored caption) — plus a version number. Entries are written atomically (temp file + rename) and read with
``weights_only=True``; anything that does not load, or loads with the wrong shapes, is reported as corrupt
and rebuilt by the caller. The file name is a key over the image's content hash, the preprocessing
settings, the caption and the text encoder's id, so changing any of them selects a new entry.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import torch

from moas.data.artist_style import STYLE_DIM
from moas.data.embeddings import IMAGE_EMBED_DIM
from moas.io import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the preprocessing changes meaning


def cache_key(content_sha256: str, size: tuple[int, int], mode: str, caption: str, encoder_id: str) -> str:
    text = f"{content_sha256}|{size[0]}x{size[1]}|{mode}|v={CACHE_VERSION}|enc={encoder_id}|cap={caption}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def entry_path(cache_dir: Path, image: Path, key: str) -> Path:
    return cache_dir / f"{image.stem[:40]}-{key[:24]}.pt"


def load_entry(
    path: Path, size: tuple[int, int], hr_size: tuple[int, int] | None = None
) -> dict[str, torch.Tensor] | None:
    """The entry at ``path`` if it exists and is intact; None if missing; None + a warning if corrupt.

    ``hr_size`` (width, height): the entry must also hold ``pixels_hr`` of that size."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        px = entry["pixels"]
        ok = (
            isinstance(entry, dict)
            and entry.get("version") == CACHE_VERSION
            and px.dtype == torch.uint8
            and tuple(px.shape) == (3, size[1], size[0])
            and tuple(entry["image_embed"].shape) == (IMAGE_EMBED_DIM,)
            and tuple(entry["style"].shape) == (STYLE_DIM,)
            and (hr_size is None or _hr_ok(entry.get("pixels_hr"), hr_size))
            and ("text_embed" not in entry or tuple(entry["text_embed"].shape) == (IMAGE_EMBED_DIM,))
        )
        if not ok:
            raise ValueError("unexpected contents")
        return _compact(entry)  # entries written before the fix above hold views of ~400 KB blocks
    except Exception as e:  # any unreadable entry is rebuilt from the image
        log.warning("Cache entry %s is corrupt (%s); rebuilding it.", path.name, type(e).__name__)
        return None


def _hr_ok(px: torch.Tensor | None, hr_size: tuple[int, int]) -> bool:
    return px is not None and px.dtype == torch.uint8 and tuple(px.shape) == (3, hr_size[1], hr_size[0])


def _compact(entry: dict) -> dict:
    """Tensors that are views of a larger block (a row of a batch of embeddings) as copies of their own:
    ``torch.save`` writes a view's whole block, which made every entry ~400 KB instead of ~10 KB."""
    return {
        k: v.clone() if torch.is_tensor(v) and v.untyped_storage().nbytes() > v.nbytes else v
        for k, v in entry.items()
    }


def save_entry(path: Path, entry: dict[str, torch.Tensor]) -> None:
    buf = io.BytesIO()
    torch.save({**_compact(entry), "version": CACHE_VERSION}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
