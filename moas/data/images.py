"""Safe image intake for training data.

Every training image goes through :func:`load_image`, which decides the format from the file's magic
bytes (never its extension), refuses anything outside :data:`ALLOWED_FORMATS`, refuses truncated
files and decompression bombs, applies EXIF orientation, composites transparency onto white and
converts every pixel mode (palette, L, LA, CMYK, 16-bit grayscale, ...) to 8-bit RGB. Failures raise
:class:`~moas.errors.ImageDecodeError` with the message ``"<file name>: <short reason>"`` and a
machine-friendly ``.reason`` code (see :data:`REASONS`).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, UnidentifiedImageError

from moas.errors import DataError, ImageDecodeError

logger = logging.getLogger(__name__)

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
# Directory names never scanned for training images: generated caches, not source data.
EXCLUDED_DIRS = frozenset({"cache", "__pycache__"})
# Possible values of ImageDecodeError.reason raised by this module.
REASONS = frozenset(
    {
        "missing",
        "empty",
        "not_an_image",
        "unsupported_format",
        "truncated",
        "decompression_bomb",
        "unreadable",
    }
)
_SNIFF_BYTES = 32
_PROGRESS_MIN_FILES = 200
_BMP_DIB_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def _decode_error(path: Path, reason: str, detail: str) -> ImageDecodeError:
    err = ImageDecodeError(f"{path.name}: {detail}")
    # errors.py keeps ImageDecodeError's constructor minimal, so the extra fields are attached here.
    err.reason = reason  # type: ignore[attr-defined]
    err.detail = detail  # type: ignore[attr-defined]
    err.path = path  # type: ignore[attr-defined]
    return err


# ----------------------------------------------------------------------------------------------
# Format sniffing
# ----------------------------------------------------------------------------------------------


def _sniff_bytes(head: bytes) -> str | None:
    """Name the image format from the leading bytes (PIL format names), or None if unknown."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    # "BM" alone is two ASCII letters (a text file could start with them), so also check the
    # DIB header size, which is one of a handful of fixed values in every real BMP.
    if (
        head.startswith(b"BM")
        and len(head) >= 18
        and int.from_bytes(head[14:18], "little") in _BMP_DIB_HEADER_SIZES
    ):
        return "BMP"
    # Recognised only to give a precise "unsupported" message instead of "not an image".
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp" and len(head) >= 12:
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xffO\xffQ"):
        return "JPEG2000"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return "JXL"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"\x00\x00\x01\x00"):
        return "ICO"
    if head.startswith(b"qoif"):
        return "QOI"
    return None


def sniff_format(path: str | os.PathLike[str]) -> str | None:
    """Return the image format of a file from its magic bytes (e.g. ``"PNG"``), or None if unknown.

    Formats outside :data:`ALLOWED_FORMATS` (GIF, TIFF, AVIF, ...) are also named when recognised.
    """
    with open(path, "rb") as f:
        return _sniff_bytes(f.read(_SNIFF_BYTES))


def _describe_non_image(data: bytes) -> str:
    """A short guess at what a non-image file really is, for the error message."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return "looks like an HTML page"
    if head.startswith(b"<?xml") or b"<svg" in head:
        return "looks like XML or SVG"
    if head.startswith((b"{", b"[")):
        return "looks like JSON"
    if head.startswith(b"pk\x03\x04"):
        return "looks like a ZIP archive"
    if head.startswith(b"%pdf"):
        return "looks like a PDF"
    try:
        text = data[:1024].decode("utf-8")
    except UnicodeDecodeError:
        return "unknown file type"
    if all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return "looks like a text file"
    return "unknown file type"


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def _looks_truncated(fmt: str, data: bytes) -> bool:
    # Used only after a decode error, to tell "cut short" (interrupted download/copy) from "garbage".
    if fmt == "PNG":
        return b"IEND" not in data[-32:]
    if fmt == "JPEG":
        return b"\xff\xd9" not in data[-64:]
    if fmt == "WEBP" and len(data) >= 8:
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    if fmt == "BMP" and len(data) >= 6:
        return int.from_bytes(data[2:6], "little") > len(data)
    return False


def _u16_to_u8(arr: np.ndarray) -> np.ndarray:
    # Exact rounding of v * 255 / 65535 (i.e. v / 257): scales the full 16-bit range, no clamping.
    wide = arr.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """Convert 16-bit / 32-bit integer / float grayscale to 8-bit ``L`` by scaling, not clamping."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        return Image.fromarray(_u16_to_u8(arr.astype(np.uint16)), "L")
    if img.mode == "I":
        # Older Pillow opens 16-bit PNGs as "I" with values 0..65535, so treat that range as 16-bit
        # (same output on every Pillow version); anything wider is scaled by its real maximum.
        arr = np.clip(arr.astype(np.int64), 0, None)
        hi = int(arr.max()) if arr.size else 0
        if hi <= 65535:
            return Image.fromarray(_u16_to_u8(arr.astype(np.uint16)), "L")
        return Image.fromarray(np.rint(arr * (255.0 / hi)).astype(np.uint8), "L")
    # "F": values in [0, 1] are normalised floats; anything larger is scaled by its maximum.
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(0.0, None)
    hi = float(arr.max()) if arr.size else 0.0
    scale = 255.0 if hi <= 1.0 else 255.0 / hi
    return Image.fromarray(np.rint(arr * scale).clip(0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, compositing transparency onto white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_bit_depth_to_l(img)
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        # Straight (non-premultiplied) compositing; convert() un-premultiplies RGBa/La first.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    # P, L, 1, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr, ...
    return img.convert("RGB")


def _reduced_jpeg(data: bytes, limit: int) -> Image.Image | None:
    """A JPEG over the pixel limit decoded at 1/2, 1/4 or 1/8 of its size (the decoder's own scaling, so the
    full image is never in memory) when that brings it under the limit; None when even 1/8 does not."""
    # The plugin class reads the header without Image.open's size check (which is why we are here);
    # nothing is decoded before draft() has chosen the scale.
    img = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    w, h = img.size
    scale = next((s for s in (2, 4, 8) if (w // s) * (h // s) <= limit), None)
    if scale is None:
        return None
    img.draft("RGB", (w // scale, h // scale))
    if img.size[0] * img.size[1] > limit:
        return None
    img.load()
    return img


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Load an image safely as a fully decoded 8-bit RGB ``PIL.Image``.

    Raises ImageDecodeError (message ``"<name>: <reason>"``, attribute ``.reason``) for missing,
    empty, non-image, unsupported, truncated, oversized or otherwise undecodable files.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise _decode_error(p, "missing", "file does not exist") from exc
    except OSError as exc:
        raise _decode_error(p, "unreadable", f"cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise _decode_error(p, "empty", "file is empty (0 bytes)")

    fmt = _sniff_bytes(data[:_SNIFF_BYTES])
    if fmt is None:
        raise _decode_error(p, "not_an_image", f"not an image ({_describe_non_image(data)})")
    if fmt not in ALLOWED_FORMATS:
        raise _decode_error(
            p, "unsupported_format", f"{fmt} images are not supported (use PNG, JPEG, WEBP or BMP)"
        )

    # A global that other code may have flipped; with it on, Pillow silently fills missing data
    # with grey and we would train on half-images.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat both as fatal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        limit = Image.MAX_IMAGE_PIXELS
        img = _reduced_jpeg(data, limit) if fmt == "JPEG" else None
        if img is None:
            raise _decode_error(
                p,
                "decompression_bomb",
                f"image is too large to decode safely (over {limit} pixels; possible decompression bomb)",
            ) from exc
        logger.info("%s: over %d pixels; decoded at reduced size %dx%d.", p.name, limit, *img.size)
    except MemoryError:
        raise
    except UnidentifiedImageError as exc:
        reason = "truncated" if _looks_truncated(fmt, data) else "unreadable"
        raise _decode_error(p, reason, f"{fmt} header is corrupt or incomplete") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, zlib/struct errors
        if "truncat" in str(exc).lower() or isinstance(exc, EOFError) or _looks_truncated(fmt, data):
            raise _decode_error(p, "truncated", "file is truncated (incomplete download or copy?)") from exc
        raise _decode_error(p, "unreadable", f"cannot decode {fmt} data ({exc})") from exc

    frames = getattr(img, "n_frames", 1)
    if frames > 1:  # an animated PNG or WebP: Pillow decoded the first frame
        logger.warning("%s is animated (%d frames); training uses its first frame.", p.name, frames)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF should not cost a good image its pixels
        logger.debug("%s: ignoring unreadable EXIF orientation (%s)", p.name, exc)
    try:
        return _to_rgb(img)
    except (ValueError, OSError) as exc:
        raise _decode_error(p, "unreadable", f"cannot convert pixel mode {img.mode} to RGB") from exc


# ----------------------------------------------------------------------------------------------
# Folder scanning and bulk validation
# ----------------------------------------------------------------------------------------------


def scan_image_files(
    folder: str | os.PathLike[str], recursive: bool = True, *, exclude_dirs: Iterable[str] = EXCLUDED_DIRS
) -> list[Path]:
    """Return the sorted image files (by suffix, case-insensitive) under ``folder``.

    Hidden files and directories (name starting with ``.``) and directories named in
    ``exclude_dirs`` (caches) are skipped. Raises DataError if ``folder`` is not a directory.
    """
    root = Path(folder)
    if not root.exists():
        raise DataError(f"Image folder {root} does not exist.")
    if not root.is_dir():
        raise DataError(f"Image folder {root} is not a directory.")
    excluded = {name.lower() for name in exclude_dirs}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning dirnames in place stops os.walk from descending into them.
        dirnames[:] = [
            d for d in dirnames if recursive and not d.startswith(".") and d.lower() not in excluded
        ]
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            candidate = Path(dirpath) / name
            if candidate.is_file():
                found.append(candidate)
    return sorted(found)


def validate_images(
    paths: Iterable[str | os.PathLike[str]], progress: bool = True
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Fully decode each image and split them into (good, [(path, reason code), ...]).

    A full decode (not just ``Image.verify()``) is used because verify() misses truncated pixel
    data. One warning is logged per skipped file.
    """
    good: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    items = [Path(p) for p in paths]
    iterator: Iterable[Path] = items
    if progress and len(items) >= _PROGRESS_MIN_FILES:
        from tqdm import tqdm

        iterator = tqdm(items, desc="Checking images", unit="img")
    for p in iterator:
        try:
            load_image(p)
        except ImageDecodeError as exc:
            skipped.append((p, getattr(exc, "reason", "unreadable")))
            logger.warning("Skipping image %s: %s", p, getattr(exc, "detail", exc))
        else:
            good.append(p)
    return good, skipped
