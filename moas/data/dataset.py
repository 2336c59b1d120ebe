"""ArtDataset: lazy image folder + paired captions + the content-keyed tensor cache.

``__init__`` stores paths only. :meth:`ArtDataset.validate` (run once, in the main process, before
training) decodes every image safely (``moas.data.images``), skips unusable files with their reason,
writes the dataset report to ``logs/``, builds each missing cache entry (pixels at the training size,
768-d image-statistics embedding, style fingerprint and — given a text encoder — the caption's pooled
text embedding), picks each image's aspect bucket and builds the artist style database. Items then come
straight from the cache: after validation no image file is opened again unless its entry is damaged.
Without validation, the first access to an item builds its entry lazily. The text encoder never runs in
DataLoader workers; it is only used inside ``validate``.

Panel sequences: images in one folder whose stems end in ``_p<number>`` (``ch1_p01.png``, ``ch1_p02.png``,
…) form a sequence ordered by that number. Each item carries ``prev_index``, the dataset index of its
previous panel (-1 for the first panel and for ordinary images), and — with ``panel_context`` K > 0 —
``panels`` uint8 [k,3,H,W], up to K previous panels nearest first, read from the cache like any item
(resized to the item's size when a bucket differs). Only pixels are loaded here; the panels' features
are computed by the model in the main process.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from moas.data.artist_style import STYLE_DIM, ArtistStyleDatabase, StyleAnalyzer, style_key
from moas.data.buckets import make_buckets, nearest_bucket
from moas.data.cache import cache_key, entry_path, load_entry, save_entry
from moas.data.captions import CAPTION_SUFFIXES, count_named, read_caption, warn_coverage
from moas.data.collate import collate, smart_collate_fn
from moas.data.embeddings import _create_image_stat_embedding
from moas.data.images import load_image, scan_image_files
from moas.data.sampler import sample_weights
from moas.errors import DataError, ImageDecodeError
from moas.io import atomic_write_bytes, clean_stray_temp_files

log = logging.getLogger(__name__)

SMALL_IMAGES = ("upscale", "skip")  # what happens to an image smaller than its training size

__all__ = ["CAPTION_SUFFIXES", "ArtDataset", "collate", "panel_links", "read_caption", "smart_collate_fn"]

PANEL_STEM = re.compile(r"^(?P<base>.+)_p(?P<num>\d+)$")


def panel_links(paths: list[Path]) -> tuple[int, ...]:
    """Index of each path's previous panel in ``paths`` (-1 when it has none); see the module docstring."""
    groups: dict[tuple[Path, str], list[tuple[int, int]]] = {}
    for i, p in enumerate(paths):
        m = PANEL_STEM.match(p.stem)
        if m:
            groups.setdefault((p.parent, m["base"]), []).append((int(m["num"]), i))
    prev = [-1] * len(paths)
    for members in groups.values():
        members.sort()
        for (_, a), (_, b) in zip(members, members[1:], strict=False):
            prev[b] = a
    return tuple(prev)


def center_crop_resize(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Crop the largest centred region with the target's aspect ratio, then resize (Lanczos)."""
    tw, th = (size, size) if isinstance(size, int) else size
    w, h = img.size
    if w * th > h * tw:  # too wide
        cw, ch = max(1, round(h * tw / th)), h
    else:
        cw, ch = w, max(1, round(w * th / tw))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch)).resize((tw, th), Image.Resampling.LANCZOS)


def _oriented_size(data: bytes) -> tuple[int, int] | None:
    """Width and height after EXIF orientation, from the header only; None if the header is unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # load_image names the reason
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                orientation = im.getexif().get(0x0112, 1)
    except Exception:
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()  # (3,H,W)


class ArtDataset(Dataset):
    """Images (+ captions) under ``root`` (see module docstring).

    Items: ``pixels`` uint8 [3, H, W], ``caption`` str, ``index`` int, ``image_embed`` float32 [768],
    ``style`` float32 [STYLE_DIM] with ``has_style`` bool, and ``text_embed`` float32 [768] when cached.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        cache_dir: str | Path | None = "cache/preprocessed",
        *,
        bucketing: bool = False,
        divisor: int = 1,
        max_aspect: float = 2.0,
        extract_style: bool = False,
        panel_context: int = 0,
        ram_cache_bytes: int = 0,
        hr_margin: float = 0.0,
        captions_from_names: bool = False,
        small_images: str = "upscale",
    ) -> None:
        self.root = Path(root)
        # Images without a caption file are captioned from their folder and file names (captions.py).
        self.captions_from_names = captions_from_names
        if small_images not in SMALL_IMAGES:
            raise DataError(
                f"data.small_images must be one of {', '.join(SMALL_IMAGES)}, got {small_images!r}."
            )
        self.small_images = small_images  # images smaller than their training size: upscaled or skipped
        self.upscaled = 0
        self._names_root = self.root if captions_from_names else None
        self.panel_context = panel_context  # previous panels loaded per item (0: none)
        self._links: tuple[list[Path], tuple[int, ...]] | None = None
        if not self.root.exists():
            raise DataError(f"Data folder {self.root} does not exist.")
        if not self.root.is_dir():
            raise DataError(f"Data folder {self.root} is not a directory.")
        self.paths = scan_image_files(self.root)
        self.resolution = resolution
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.bucketing = bucketing
        self.buckets = make_buckets(resolution, divisor, max_aspect) if bucketing else [(resolution,) * 2]
        self.extract_style = extract_style
        self.analyzer = StyleAnalyzer()
        self.encoder_id = "none"
        self.skipped: list[tuple[Path, str]] = []
        self.skipped_detail: list[str] = []
        self.bucket_ids: list[int] = [0] * len(self.paths)
        self.style_keys: list[str | None] = []
        self.style_db = ArtistStyleDatabase()
        self._style_vecs: dict[str, torch.Tensor] = {}
        self._entries: list[Path | None] | None = None  # known entry files after validate()
        self._captions: list[str] | None = None
        self.rebuilt = 0  # entries (re)built by this process, for tests and the report
        # Validated entries kept in RAM after their first read, up to this many bytes per process (split
        # between DataLoader workers); the first ones that fit stay, so a set larger than the budget still
        # gets that share of hits every epoch, where least-recently-used would cycle through and hit none.
        self.ram_cache_bytes = ram_cache_bytes
        # > 1: entries also keep the crop at this multiple of the training size (``pixels_hr``) for the
        # image augmentation to crop from (moas.data.augment).
        self.hr_margin = hr_margin
        self._ram: dict[int, dict[str, torch.Tensor]] = {}
        self._ram_used = 0

    # ---- the original's disabled fallback -------------------------------------------------------

    def _create_dummy_samples(self, n: int = 0) -> None:
        raise ValueError(
            "ArtDataset does not invent training data: put real images (PNG, JPEG, WEBP or BMP, with "
            "optional .txt captions of the same name) in the data folder, or run 'moas make-data' for "
            "the procedural demo set."
        )

    # ---- validation / cache building ------------------------------------------------------------

    @property
    def mode(self) -> str:
        base = "bucket" if self.bucketing else "square"
        return f"{base}+hr{self.hr_margin:g}" if self.hr_margin > 1 else base

    def _hr(self, bucket: int) -> tuple[int, int] | None:
        """(width, height) of the larger copy kept for bucket ``bucket``, or None when none is kept."""
        if self.hr_margin <= 1:
            return None
        w, h = self.buckets[bucket]
        return (round(w * self.hr_margin), round(h * self.hr_margin))

    def _target(self, size: tuple[int, int]) -> int:
        return nearest_bucket(size[0], size[1], self.buckets) if self.bucketing else 0

    def _key_entry(
        self, path: Path, data: bytes, size: tuple[int, int], caption: str
    ) -> tuple[int, Path | None]:
        b = self._target(size)
        if self.cache_dir is None:
            return b, None
        key = cache_key(
            hashlib.sha256(data).hexdigest(), self.buckets[b], self.mode, caption, self.encoder_id
        )
        return b, entry_path(self.cache_dir, path, key)

    def _check_one(self, path: Path, skipped: list, details: list) -> tuple | None:
        """(caption, cache entry, bucket, entry path) of one image, its entry built when missing; None when
        it is skipped (the reason added to ``skipped`` and ``details``)."""
        try:
            caption = read_caption(path, self._names_root)
            data = path.read_bytes()
            size = _oriented_size(data)
            entry, b, ep = None, 0, None
            if size is not None and self._skip_small(path, size, skipped, details):
                return None
            if size is not None:
                b, ep = self._key_entry(path, data, size, caption)
                entry = load_entry(ep, self.buckets[b], self._hr(b)) if ep is not None else None
            if entry is None:
                img = load_image(path)  # full decode: the safe-intake checks and their reasons
                if size is None and self._skip_small(path, img.size, skipped, details):
                    return None
                b, ep = self._key_entry(path, data, img.size, caption)
                entry = self._build(img, b, caption)
                if ep is not None:
                    save_entry(ep, entry)
                    self.rebuilt += 1
        except ImageDecodeError as exc:
            skipped.append((path, getattr(exc, "reason", "unreadable")))
            details.append(getattr(exc, "detail", str(exc)))
            log.warning("Skipping image %s: %s", path, getattr(exc, "detail", exc))
            return None
        except OSError as exc:
            skipped.append((path, "unreadable"))
            details.append(f"cannot read file ({exc.strerror or exc})")
            log.warning("Skipping image %s: %s", path, exc)
            return None
        return caption, entry, b, ep

    def _skip_small(self, path: Path, size: tuple[int, int], skipped: list, details: list) -> bool:
        """Whether to leave out an image smaller than its training size (``small_images = "skip"``); one
        that is kept is counted (it is upscaled, so it is softer than the others)."""
        bw, bh = self.buckets[self._target(size)]
        if size[0] >= bw and size[1] >= bh:
            return False
        if self.small_images == "upscale":
            self.upscaled += 1
            return False
        skipped.append((path, "smaller than the training size"))
        details.append(f"{size[0]}x{size[1]} is smaller than the {bw}x{bh} training size")
        return True

    def _build(self, img: Image.Image, bucket: int, caption: str) -> dict[str, torch.Tensor]:
        px = _to_tensor(center_crop_resize(img, self.buckets[bucket]))  # (3, H, W)
        entry = {"pixels": px, "image_embed": _create_image_stat_embedding(px), "style": self.analyzer(px)}
        hr = self._hr(bucket)
        if hr is not None:
            entry["pixels_hr"] = _to_tensor(center_crop_resize(img, hr))  # (3, H', W')
        return entry

    def validate(
        self,
        max_bad_fraction: float = 0.5,
        progress: bool = True,
        report_dir: str | Path | None = None,
        encoder=None,
    ) -> dict:
        """Check every image, build missing cache entries, write the report; stop if too much is bad."""
        if not self.paths:
            raise DataError(
                f"No images found in {self.root} (looked for .png, .jpg, .jpeg, .webp, .bmp files, recursively)."
            )
        if encoder is not None:
            self.encoder_id = encoder.encoder_id
        self.upscaled = 0
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            clean_stray_temp_files(self.cache_dir)
        good, entries, buckets, captions, fingerprints, no_text = [], [], [], [], [], []
        skipped, details = [], []
        bar = tqdm(
            self.paths, desc="checking images", unit="img", disable=not progress or len(self.paths) < 50
        )
        for path in bar:
            checked = self._check_one(path, skipped, details)
            if checked is None:
                continue
            caption, entry, b, ep = checked
            good.append(path)
            entries.append(ep)
            buckets.append(b)
            captions.append(caption)
            fingerprints.append(entry["style"])
            if ep is not None and "text_embed" not in entry:
                no_text.append(len(good) - 1)
        self.paths, self.skipped, self.skipped_detail = good, skipped, details
        self._entries, self.bucket_ids, self._captions = entries, buckets, captions
        report = self.report()
        if report_dir is not None:
            self.write_report(report_dir, report)
        total = len(good) + len(skipped)
        if not good:
            raise DataError(f"None of the {total} image files in {self.root} could be read.")
        if len(skipped) / total > max_bad_fraction:
            raise DataError(
                f"{len(skipped)} of {total} image files in {self.root} are unreadable "
                f"(more than the allowed {max_bad_fraction:.0%}); see the dataset report and warnings above."
            )
        if self.upscaled:
            log.info(
                "%d of %d images are smaller than the training size and are upscaled (softer than the others; "
                'data.small_images = "skip" leaves them out).',
                self.upscaled,
                len(good),
            )
        named = count_named(good, captions) if self._names_root is not None else 0
        warn_coverage(report["captioned"], len(good), self.root, named)
        if encoder is not None and self.cache_dir is not None:
            self._fill_text_embeddings(encoder, no_text, progress)
        self.style_keys = [style_key(p, self.root) for p in good]
        if self.extract_style:
            self.style_db = ArtistStyleDatabase()
            for key, fp in zip(self.style_keys, fingerprints, strict=True):
                if key is not None:
                    self.style_db.add(key, fp)
            self._style_vecs = {k: self.style_db.get(k) for k in self.style_db.names()}
        return report

    def _fill_text_embeddings(self, encoder, todo: list[int], progress: bool, chunk: int = 128) -> None:
        """Add the pooled caption embedding to the entries ``todo`` (main process only)."""
        assert self._entries is not None and self._captions is not None
        bar = tqdm(
            total=len(todo), desc="caching text embeddings", unit="cap", disable=not progress or not todo
        )
        for k in range(0, len(todo), chunk):
            part = todo[k : k + chunk]
            pooled = encoder.encode([self._captions[i] for i in part]).pooled  # (n, 768)
            for j, i in enumerate(part):
                ep = self._entries[i]
                b = self.bucket_ids[i]
                entry = load_entry(ep, self.buckets[b], self._hr(b))
                if entry is not None:
                    save_entry(ep, {**entry, "text_embed": pooled[j].float().contiguous()})
            bar.update(len(part))
        bar.close()

    def report(self) -> dict:
        reasons = Counter(r for _, r in self.skipped)
        captions = self._captions if self._captions is not None else []
        return {
            "root": str(self.root),
            "total": len(self.paths) + len(self.skipped),
            "valid": len(self.paths),
            "skipped": len(self.skipped),
            "by_reason": dict(sorted(reasons.items())),
            "captioned": sum(1 for c in captions if c),
            "upscaled": self.upscaled,
            "buckets": {f"{w}x{h}": self.bucket_ids.count(i) for i, (w, h) in enumerate(self.buckets)},
        }

    def write_report(self, report_dir: str | Path, report: dict | None = None) -> Path:
        """``dataset_report.json`` (counts per reason) and ``dataset_skipped.jsonl`` (one line per file)."""
        d = Path(report_dir)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / "dataset_report.json", json.dumps(report or self.report(), indent=2).encode())
        lines = [
            json.dumps({"path": str(p), "reason": r, "detail": det})
            for (p, r), det in zip(self.skipped, self.skipped_detail, strict=True)
        ]
        atomic_write_bytes(d / "dataset_skipped.jsonl", ("\n".join(lines) + "\n" if lines else "").encode())
        return d / "dataset_report.json"

    # ---- access --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.paths)

    def captions(self) -> list[str]:
        known = self._captions
        return list(known) if known is not None else [read_caption(p, self._names_root) for p in self.paths]

    def weights(self) -> list[float]:
        """Per-image sample weights: ``N_name`` repeat folders × ``multiply.txt`` values."""
        return sample_weights(self.paths, self.root)

    def prev_indices(self) -> tuple[int, ...]:
        """Previous-panel index of every item, for the current file list (a subset gets its own)."""
        if self._links is None or self._links[0] is not self.paths:
            self._links = (self.paths, panel_links(self.paths))
        return self._links[1]

    def has_sequences(self) -> bool:
        return any(j >= 0 for j in self.prev_indices())

    def _panels(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        """Up to ``panel_context`` previous panels of ``index``, nearest first: uint8 (k, 3, H, W)."""
        prev, out, j = self.prev_indices(), [], self.prev_indices()[index]
        while j >= 0 and len(out) < self.panel_context:
            px = self._load_entry(j)["pixels"]  # (3, h, w)
            if tuple(px.shape[-2:]) != size:
                px = torch.nn.functional.interpolate(px[None].float(), size=size, mode="area")[0]
                px = px.round().clamp(0, 255).to(torch.uint8)
            out.append(px)
            j = prev[j]
        return torch.stack(out) if out else torch.zeros(0, 3, *size, dtype=torch.uint8)

    def _load_entry(self, index: int) -> dict[str, torch.Tensor]:
        entry = self._ram.get(index)
        if entry is None:
            entry = self._read_entry(index)
            self._keep_in_ram(index, entry)
        return entry

    def _keep_in_ram(self, index: int, entry: dict[str, torch.Tensor]) -> None:
        if self._entries is None or not self.ram_cache_bytes:  # only what validation checked
            return
        worker = torch.utils.data.get_worker_info()
        budget = self.ram_cache_bytes // (worker.num_workers if worker is not None else 1)
        size = sum(t.numel() * t.element_size() for t in entry.values() if isinstance(t, torch.Tensor))
        if self._ram_used + size <= budget:
            self._ram[index] = entry
            self._ram_used += size

    def _read_entry(self, index: int) -> dict[str, torch.Tensor]:
        path = self.paths[index]
        b = self.bucket_ids[index]
        ep = self._entries[index] if self._entries is not None else None
        if ep is not None:
            entry = load_entry(ep, self.buckets[b], self._hr(b))
            if entry is not None:
                return entry
        # Lazy path: not validated yet, no cache, or a damaged entry.
        caption = (
            self._captions[index] if self._captions is not None else read_caption(path, self._names_root)
        )
        data = path.read_bytes()
        size = _oriented_size(data)
        if self._entries is None and size is not None:
            b, ep = self._key_entry(path, data, size, caption)
            self.bucket_ids[index] = b
            entry = load_entry(ep, self.buckets[b], self._hr(b)) if ep is not None else None
            if entry is not None:
                return entry
        img = load_image(path)
        if self._entries is None:
            b, ep = self._key_entry(path, data, img.size, caption)
            self.bucket_ids[index] = b
        entry = self._build(img, b, caption)
        if ep is not None:
            save_entry(ep, entry)
            self.rebuilt += 1
        return entry

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            entry = self._load_entry(index)
        except (ImageDecodeError, OSError) as e:  # a file that changed since validation
            raise DataError(f"Image {path} became unreadable during training: {e}") from None
        key = self.style_keys[index] if self.style_keys else None
        has_style = self.extract_style and key in self._style_vecs
        item = {
            "pixels": entry["pixels"],
            "caption": self._captions[index]
            if self._captions is not None
            else read_caption(path, self._names_root),
            "index": index,
            "image_embed": entry["image_embed"],
            "style": self._style_vecs[key] if has_style else torch.zeros(STYLE_DIM),
            "has_style": has_style,
        }
        if "text_embed" in entry:
            item["text_embed"] = entry["text_embed"]
        if "pixels_hr" in entry:
            item["pixels_hr"] = entry["pixels_hr"]
        item["prev_index"] = self.prev_indices()[index]
        if self.panel_context > 0:
            try:
                item["panels"] = self._panels(index, tuple(entry["pixels"].shape[-2:]))
            except (ImageDecodeError, OSError) as e:
                raise DataError(
                    f"A previous panel of {path} became unreadable during training: {e}"
                ) from None
        return item


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1]."""
    return pixels.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] → uint8 [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
