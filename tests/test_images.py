"""Tests for moas.data.images: safe decoding, mode conversion, scanning and bulk validation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from moas.data import images
from moas.data.images import load_image, scan_image_files, sniff_format, validate_images
from moas.errors import DataError, ImageDecodeError


def _noise(size: tuple[int, int] = (32, 24), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _save(img: Image.Image, path: Path, fmt: str, **kwargs) -> Path:
    img.save(path, fmt, **kwargs)
    return path


def _reason(path: Path) -> str:
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path.name}: "), message
    assert info.value.reason in images.REASONS
    return info.value.reason


@pytest.mark.parametrize(
    "fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp")]
)
def test_good_formats_load_as_rgb(tmp_path: Path, fmt: str, suffix: str) -> None:
    src = _noise()
    path = _save(src, tmp_path / f"img{suffix}", fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert sniff_format(path) == fmt
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (32, 24)
    if fmt != "JPEG":  # lossless formats must round-trip exactly
        assert np.array_equal(np.asarray(img), np.asarray(src))


def test_magic_bytes_win_over_extension(tmp_path: Path) -> None:
    path = _save(_noise(), tmp_path / "actually_jpeg.png", "JPEG")
    assert sniff_format(path) == "JPEG"
    assert load_image(path).size == (32, 24)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert _reason(path) == "empty"


def test_missing_file(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.png") == "missing"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    full = _save(_noise((64, 64)), tmp_path / "full.img", fmt)
    data = full.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    assert _reason(cut) == "truncated"


def test_truncated_refused_even_if_global_flag_was_enabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _save(_noise((64, 64)), tmp_path / "full.png", "PNG").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    assert _reason(cut) == "truncated"


def test_html_renamed_png(tmp_path: Path) -> None:
    path = tmp_path / "page.png"
    path.write_text("<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>\n")
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert info.value.reason == "not_an_image"
    assert "HTML" in str(info.value)
    assert sniff_format(path) is None


def test_bm_text_is_not_sniffed_as_bmp(tmp_path: Path) -> None:
    path = tmp_path / "note.bmp"
    path.write_text("BMW owners manual, page one of many pages of plain text.\n")
    assert sniff_format(path) is None
    assert _reason(path) == "not_an_image"


def test_gif_renamed_png_is_unsupported(tmp_path: Path) -> None:
    path = _save(_noise().convert("P"), tmp_path / "anim.png", "GIF")
    assert sniff_format(path) == "GIF"
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert info.value.reason == "unsupported_format"
    assert "GIF" in str(info.value)


def test_corrupt_pixel_data_is_unreadable_or_truncated(tmp_path: Path) -> None:
    data = bytearray(_save(_noise((64, 64)), tmp_path / "ok.png", "PNG").read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 8 : idat + 200] = b"\x00" * 192  # wreck the zlib stream, keep the file length
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    assert _reason(bad) in {"unreadable", "truncated"}


def test_rgba_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    img = load_image(_save(rgba, tmp_path / "a.png", "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in img.getpixel((1, 0)))
    assert img.getpixel((3, 1)) == (10, 20, 30)


def test_palette_image(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 10, 50] + [0] * (256 * 3 - 6))
    pal.putpixel((0, 0), 0)
    img = load_image(_save(pal, tmp_path / "p.png", "PNG"))
    assert img.getpixel((1, 1)) == (200, 10, 50)
    assert img.getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_transparency_becomes_white(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 10, 50] + [0] * (256 * 3 - 6))
    pal.putpixel((0, 0), 0)
    img = load_image(_save(pal, tmp_path / "pt.png", "PNG", transparency=0))
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 1)) == (200, 10, 50)


def test_la_image(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1), (100, 255))
    la.putpixel((1, 0), (0, 0))
    img = load_image(_save(la, tmp_path / "la.png", "PNG"))
    assert img.getpixel((0, 0)) == (100, 100, 100)
    assert img.getpixel((1, 0)) == (255, 255, 255)


def test_grayscale_l(tmp_path: Path) -> None:
    img = load_image(_save(Image.new("L", (3, 3), 77), tmp_path / "l.png", "PNG"))
    assert img.mode == "RGB" and img.getpixel((1, 1)) == (77, 77, 77)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    white = load_image(
        _save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path / "w.jpg", "JPEG", quality=100)
    )
    cyan = load_image(
        _save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path / "c.jpg", "JPEG", quality=100)
    )
    assert all(c >= 250 for c in white.getpixel((4, 4)))
    r, g, b = cyan.getpixel((4, 4))
    assert r <= 5 and g >= 250 and b >= 250


def test_16bit_png_is_scaled_not_clamped(tmp_path: Path) -> None:
    arr = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    src = Image.fromarray(arr)
    assert src.mode.startswith("I;16")
    img = load_image(_save(src, tmp_path / "g16.png", "PNG"))
    assert img.mode == "RGB"
    values = [img.getpixel((x, 0))[0] for x in range(4)]
    assert values[0] == 255
    assert values[1] in (127, 128)
    assert values[2] == 0
    assert values[3] == 1


def test_16bit_big_endian_and_int32_modes() -> None:
    big = Image.frombytes("I;16B", (2, 1), np.array([65535, 32768], dtype=">u2").tobytes())
    assert [images._to_rgb(big).getpixel((x, 0))[0] for x in range(2)] == [255, 128]
    # Mode "I" (how older Pillow opens 16-bit PNGs) holding 16-bit data is scaled by 257 too.
    i16 = Image.fromarray(np.array([[65535, 32768, 0]], dtype=np.int32))
    assert i16.mode == "I"
    assert [images._to_rgb(i16).getpixel((x, 0))[0] for x in range(3)] == [255, 128, 0]
    # Wider than 16 bits: scaled by the real maximum rather than clipped.
    wide = Image.fromarray(np.array([[1_000_000, 500_000]], dtype=np.int32))
    assert [images._to_rgb(wide).getpixel((x, 0))[0] for x in range(2)] == [255, 128]


def test_exif_orientation_applied(tmp_path: Path) -> None:
    src = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(src, tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes())
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize("limit", [1000, 3000])  # 4096 px: over 2x the limit (error) / just over (warning)
def test_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    path = _save(_noise((64, 64)), tmp_path / "big.png", "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    assert _reason(path) == "decompression_bomb"


def test_a_jpeg_over_the_pixel_limit_is_decoded_at_reduced_size(tmp_path: Path, monkeypatch, caplog) -> None:
    """The JPEG decoder scales by 1/2, 1/4 or 1/8 without decoding the whole image; a PNG cannot."""
    jpeg = _save(_noise((256, 192)), tmp_path / "huge.jpg", "JPEG", quality=90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 49,152 pixels: 1/4 scale fits, 1/2 does not
    with caplog.at_level(logging.INFO):
        img = load_image(jpeg)
    assert img.size == (64, 48) and img.mode == "RGB" and "decoded at reduced size 64x48" in caplog.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # even 1/8 (32x24 = 768) is over: skipped
    assert _reason(jpeg) == "decompression_bomb"


def test_an_animated_image_trains_on_its_first_frame_with_a_note(tmp_path: Path, caplog) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with caplog.at_level(logging.WARNING):
        img = load_image(path)
    assert img.getpixel((1, 1)) == (255, 0, 0) and "animated (3 frames)" in caplog.text


def test_scan_image_files(tmp_path: Path) -> None:
    for rel in ["a.png", "B.JPG", "sub/c.webp", "sub/deeper/d.bmp", "x.jpeg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    for rel in [".hidden.png", ".git/e.png", "cache/f.png", "notes.txt", "g.gif", "h.png.json"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()  # a directory with an image suffix is not a file
    found = scan_image_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "B.JPG",
        "a.png",
        "sub/c.webp",
        "sub/deeper/d.bmp",
        "x.jpeg",
    ]
    flat = scan_image_files(tmp_path, recursive=False)
    assert [p.name for p in flat] == ["B.JPG", "a.png", "x.jpeg"]


def test_scan_missing_or_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan_image_files(tmp_path / "missing")
    file_path = tmp_path / "f.png"
    file_path.write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        scan_image_files(file_path)
    (tmp_path / "empty").mkdir()
    assert scan_image_files(tmp_path / "empty") == []


def test_validate_images_splits_good_and_bad(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good1 = _save(_noise(seed=1), tmp_path / "good1.png", "PNG")
    good2 = _save(_noise(seed=2), tmp_path / "good2.jpg", "JPEG")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    html = tmp_path / "page.webp"
    html.write_text("<html></html>")
    data = _save(_noise((64, 64)), tmp_path / "t.png", "PNG").read_bytes()
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(data[:300])
    gif = _save(_noise().convert("P"), tmp_path / "anim.png", "GIF")

    with caplog.at_level(logging.WARNING, logger="moas.data.images"):
        good, skipped = validate_images([good1, empty, html, good2, trunc, gif], progress=False)
    assert good == [good1, good2]
    assert skipped == [
        (empty, "empty"),
        (html, "not_an_image"),
        (trunc, "truncated"),
        (gif, "unsupported_format"),
    ]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert "trunc.png" in warnings[2].getMessage()
