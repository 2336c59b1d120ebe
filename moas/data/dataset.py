"""ArtDataset (first cut): lazy image folder + paired captions + content-keyed pixel cache.

``__init__`` stores paths only. The first access to an image decodes it safely (``moas.data.images``),
centre-crops and resizes it to the training resolution and writes a tensors-only ``.pt`` entry under
``cache/preprocessed/``; later accesses load that entry with ``weights_only=True``. The cache key covers
the file's content hash and the preprocessing settings, so editing an image or changing the resolution
builds a new entry, and a truncated or corrupt entry is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from moas.data.images import load_image, scan_image_files, validate_images
from moas.errors import DataError, ImageDecodeError
from moas.train.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the preprocessing changes meaning
CAPTION_SUFFIXES = (".txt", ".caption")


def read_caption(image_path: Path) -> str:
    """The caption paired by file stem (``image.png`` → ``image.txt``), or "" when there is none."""
    for suffix in CAPTION_SUFFIXES:
        p = image_path.with_suffix(suffix)
        if p.is_file():
            raw = p.read_bytes()
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                log.warning("%s is not UTF-8; decoding it as Latin-1.", p.name)
                text = raw.decode("latin-1")
            return " ".join(text.split())
    return ""


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.LANCZOS)


def content_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ArtDataset(Dataset):
    """Images (+ captions) under ``root``; items are ``{"pixels": uint8 [3,H,W], "caption": str, "index": int}``."""

    def __init__(
        self, root: str | Path, resolution: int, cache_dir: str | Path | None = "cache/preprocessed"
    ) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"Data folder {self.root} does not exist.")
        self.paths = scan_image_files(self.root)
        self.resolution = resolution
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.skipped: list[tuple[Path, str]] = []
        self._keys: dict[Path, tuple[int, int, str]] = {}  # path → (mtime_ns, size, cache key)

    def validate(self, max_bad_fraction: float = 0.5, progress: bool = True) -> None:
        """Drop unreadable files (each logged with its reason); stop if nothing usable remains."""
        if not self.paths:
            raise DataError(
                f"No images found in {self.root} (looked for .png, .jpg, .jpeg, .webp, .bmp files, recursively)."
            )
        good, bad = validate_images(self.paths, progress=progress)
        self.paths, self.skipped = good, bad
        total = len(good) + len(bad)
        if not good:
            raise DataError(f"None of the {total} image files in {self.root} could be read.")
        if len(bad) / total > max_bad_fraction:
            raise DataError(
                f"{len(bad)} of {total} image files in {self.root} are unreadable "
                f"(more than the allowed {max_bad_fraction:.0%}); see the warnings above."
            )

    def __len__(self) -> int:
        return len(self.paths)

    def captions(self) -> list[str]:
        return [read_caption(p) for p in self.paths]

    def _cache_path(self, path: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(
            f"{content_hash(path)}|res={self.resolution}|v={CACHE_VERSION}".encode()
        ).hexdigest()
        return self.cache_dir / f"{path.stem[:40]}-{key[:24]}.pt"

    def load_pixels(self, path: Path) -> torch.Tensor:
        cache = self._cache_path(path)
        if cache is not None and cache.is_file():
            try:
                entry = torch.load(cache, map_location="cpu", weights_only=True)
                px = entry["pixels"]
                if px.dtype == torch.uint8 and tuple(px.shape) == (3, self.resolution, self.resolution):
                    return px
                raise ValueError("unexpected shape")
            except Exception as e:  # any unreadable entry is rebuilt from the image
                log.warning("Cache entry %s is corrupt (%s); rebuilding it.", cache.name, type(e).__name__)
        img = center_crop_resize(load_image(path), self.resolution)
        px = (
            torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        )  # (3, H, W)
        if cache is not None:
            buf = io.BytesIO()
            torch.save({"pixels": px, "version": CACHE_VERSION}, buf)
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(cache, buf.getvalue())
        return px

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            px = self.load_pixels(path)
        except ImageDecodeError as e:  # a file that changed since validation
            raise DataError(f"Image {path} became unreadable during training: {e}") from None
        return {"pixels": px, "caption": read_caption(path), "index": index}


def collate(items: list[dict]) -> dict:
    return {
        "pixels": torch.stack([it["pixels"] for it in items]),  # (B, 3, H, W) uint8
        "captions": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1]."""
    return pixels.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
