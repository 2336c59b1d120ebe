"""Quality filters shared by ``moas prepare`` (a local folder) and ``moas download`` (Danbooru).

Thresholds are the original's (see :class:`QualityThresholds`): long edge ≥ 512 px, short edge ≥ 256 px,
aspect ratio 0.33–3.0, colour std > 15, Laplacian variance > 30, contrast (grey-level std) > 20, more than
100 unique colours when the image is near pure black or white, and full-file MD5 duplicates. Statistics are
computed on the decoded 8-bit RGB image (0–255 scale). ``moas prepare`` only reports and, when asked,
moves rejects to another folder: originals are never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from moas.data.captions import CAPTION_SUFFIXES
from moas.data.images import load_image, scan_image_files
from moas.errors import DataError, ImageDecodeError
from moas.io import atomic_write_bytes

log = logging.getLogger(__name__)

HASH_WORKERS = 8  # the original's ThreadPoolExecutor(max_workers=8)


@dataclass(frozen=True)
class QualityThresholds:
    min_long_edge: int = 512  # pixels
    min_short_edge: int = 256  # pixels
    min_aspect: float = 0.33  # width / height
    max_aspect: float = 3.0
    min_color_std: float = 15.0  # std of all RGB values
    min_sharpness: float = 30.0  # variance of the 4-neighbour Laplacian of the grey image
    min_contrast: float = 20.0  # std of the grey image
    min_unique_colors: int = 100  # required only when the image is near pure black or white
    near_extreme: float = 20.0  # "near pure black/white": mean grey level within this of 0 or 255


def _grey(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def laplacian_variance(grey: np.ndarray) -> float:
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0
    lap = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    return float(lap.var())


def quality_reason(img: Image.Image, t: QualityThresholds = QualityThresholds()) -> str | None:
    """The first failed quality check as a reason code (e.g. ``"too_small"``), or None if it passes."""
    w, h = img.size
    if max(w, h) < t.min_long_edge or min(w, h) < t.min_short_edge:
        return "too_small"
    if not t.min_aspect <= w / h <= t.max_aspect:
        return "bad_aspect"
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    if rgb.std() <= t.min_color_std:
        return "low_color_variance"
    grey = _grey(rgb)
    if laplacian_variance(grey) <= t.min_sharpness:
        return "blurry"
    if grey.std() <= t.min_contrast:
        return "low_contrast"
    mean = grey.mean()
    if mean < t.near_extreme or mean > 255 - t.near_extreme:
        q = np.asarray(img.convert("RGB"), dtype=np.uint8).reshape(-1, 3).astype(np.int64)
        if len(np.unique(q[:, 0] << 16 | q[:, 1] << 8 | q[:, 2])) <= t.min_unique_colors:
            return "too_few_colors"
    return None


def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def md5_many(paths: list[Path], progress: bool = False) -> dict[Path, str]:
    """MD5 of each file, hashed in ThreadPoolExecutor(8); unreadable files are left out."""

    def one(p: Path) -> tuple[Path, str | None]:
        try:
            return p, md5_file(p)
        except OSError:
            return p, None

    with ThreadPoolExecutor(max_workers=HASH_WORKERS) as pool:
        results = list(
            tqdm(pool.map(one, paths), total=len(paths), desc="hashing", disable=not progress, unit="file")
        )
    return {p: h for p, h in results if h is not None}


def check_folder(
    data_dir: str | Path, thresholds: QualityThresholds = QualityThresholds(), progress: bool = True
) -> tuple[list[Path], list[tuple[Path, str, str]]]:
    """Split a folder's images into (kept, [(path, reason, detail)]). The first of duplicates is kept."""
    root = Path(data_dir)
    paths = scan_image_files(root)
    if not paths:
        raise DataError(f"No images found in {root} (looked for .png, .jpg, .jpeg, .webp, .bmp files).")
    hashes = md5_many(paths, progress)
    seen: dict[str, Path] = {}
    kept, rejected = [], []
    for p in tqdm(paths, desc="checking quality", unit="img", disable=not progress):
        try:
            img = load_image(p)
        except ImageDecodeError as e:
            rejected.append((p, getattr(e, "reason", "unreadable"), getattr(e, "detail", str(e))))
            continue
        digest = hashes.get(p)
        if digest in seen:
            rejected.append((p, "duplicate", f"same bytes as {seen[digest].relative_to(root)}"))
            continue
        reason = quality_reason(img, thresholds)
        if reason:
            rejected.append((p, reason, f"{img.size[0]}x{img.size[1]}"))
            continue
        if digest:
            seen[digest] = p
        kept.append(p)
    return kept, rejected


def _move_with_caption(path: Path, root: Path, dest_root: Path) -> None:
    dest = dest_root / path.relative_to(root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        raise DataError(f"Cannot move {path} to {dest}: a file with that name already exists there.")
    shutil.move(str(path), dest)
    for suffix in CAPTION_SUFFIXES:
        cap = path.with_suffix(suffix)
        if cap.is_file():
            shutil.move(str(cap), dest.with_suffix(suffix))


def prepare_folder(
    data_dir: str | Path,
    move_rejects: str | Path | None = None,
    report_path: str | Path | None = None,
    thresholds: QualityThresholds = QualityThresholds(),
    progress: bool = True,
) -> dict:
    """Run the quality filters over ``data_dir``; write a JSON report; optionally move rejects away."""
    root = Path(data_dir)
    kept, rejected = check_folder(root, thresholds, progress)
    if move_rejects is not None:
        dest = Path(move_rejects).resolve()
        if dest == root.resolve() or root.resolve() in dest.parents:
            raise DataError("--move_rejects must be a folder outside --data_dir.")
        for p, _, _ in rejected:
            _move_with_caption(p, root, dest)
    report = {
        "data_dir": str(root),
        "total": len(kept) + len(rejected),
        "kept": len(kept),
        "rejected": len(rejected),
        "by_reason": dict(sorted(Counter(r for _, r, _ in rejected).items())),
        "moved_to": str(move_rejects) if move_rejects is not None else None,
        "rejects": [{"path": str(p.relative_to(root)), "reason": r, "detail": d} for p, r, d in rejected],
    }
    if report_path is not None:
        rp = Path(report_path)
        rp.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(rp, json.dumps(report, indent=2).encode())
    return report
