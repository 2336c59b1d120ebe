"""The bad-file zoo: every intake case is converted correctly or skipped with the right reason, the
dataset report lands in logs/, and training on a folder mixing the zoo with good images completes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moas.cli import main
from moas.data.dataset import ArtDataset

from .conftest import TINY_CONFIG


def _noise(w: int = 24, h: int = 20, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# name → expected skip reason
BAD = {
    "zero_byte.png": "empty",
    "truncated.png": "truncated",
    "truncated.jpg": "truncated",
    "html_renamed.jpg": "not_an_image",
    "gif_renamed.png": "unsupported_format",
    "garbage.webp": "not_an_image",
    "bomb.png": "decompression_bomb",
}


def make_zoo(folder: Path, n_good: int = 8) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        _noise(seed=i).save(folder / f"good_{i:02d}.png")
        (folder / f"good_{i:02d}.txt").write_text(f"1girl, tag{i}")
    (folder / "zero_byte.png").write_bytes(b"")
    png = _bytes(_noise(64, 64), "PNG")
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    jpg = _bytes(_noise(64, 64), "JPEG")
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "html_renamed.jpg").write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    (folder / "gif_renamed.png").write_bytes(_bytes(_noise(), "GIF"))
    (folder / "garbage.webp").write_bytes(bytes(range(256)) * 4)
    # 10000² pixels lies between Pillow's warning and error limits: the warning must count as an error.
    (folder / "bomb.png").write_bytes(_bytes(Image.new("1", (10000, 10000)), "PNG"))
    # Converted cases.
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.save(folder / "alpha_transparent.png")
    Image.new("P", (16, 16), 0).save(folder / "palette.png")  # palette entry 0 = black
    Image.new("LA", (16, 16), (0, 0)).save(folder / "la_transparent.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=100)  # red
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(folder / "gray16.png")
    Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(folder / "gray16_mid.png")
    tall = np.zeros((32, 16, 3), dtype=np.uint8)
    tall[:16] = 255  # white top half, black bottom half as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: the white half ends up on the right
    Image.fromarray(tall).save(folder / "exif_rotated.jpg", exif=exif, quality=100)
    return BAD


def test_zoo_is_converted_or_skipped_with_reasons(tmp_path):
    bad = make_zoo(tmp_path / "zoo")
    ds = ArtDataset(tmp_path / "zoo", 16, tmp_path / "cache")
    report = ds.validate(max_bad_fraction=0.5, progress=False, report_dir=tmp_path / "logs")
    assert {p.name: r for p, r in ds.skipped} == bad
    assert report["skipped"] == len(bad) and report["valid"] == 8 + 7
    assert report["by_reason"] == {r: list(bad.values()).count(r) for r in set(bad.values())}
    saved = json.loads((tmp_path / "logs" / "dataset_report.json").read_text())
    assert saved["by_reason"] == report["by_reason"]
    lines = [json.loads(x) for x in (tmp_path / "logs" / "dataset_skipped.jsonl").read_text().splitlines()]
    assert {Path(x["path"]).name: x["reason"] for x in lines} == bad and all(x["detail"] for x in lines)

    px = {p.name: ds[i]["pixels"].float() for i, p in enumerate(ds.paths)}  # (3, 16, 16)
    assert px["alpha_transparent.png"].min() == 255  # transparent → white, not the hidden red
    assert px["la_transparent.png"].min() == 255
    assert px["palette.png"].max() == 0
    red = px["cmyk.jpg"].mean((1, 2))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    assert px["gray16.png"].min() == 255  # 16-bit scaled, not clamped ...
    assert torch.all((px["gray16_mid.png"] - 128).abs() <= 1)  # ... 32896/65535 → 128, not 255
    rot = px["exif_rotated.jpg"].mean(0)  # (16, 16); after orientation the white half is on the right
    assert rot[:, 12:].mean() > 200 and rot[:, :4].mean() < 50


def test_too_many_bad_files_stop_before_training(tmp_path, monkeypatch, capsys):
    make_zoo(tmp_path / "zoo", n_good=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOAS_DATA_MAX_BAD_FRACTION", "0.3")  # 7 of 16 files are bad
    code = main(["train", "--config", str(TINY_CONFIG), "--data_dir", "zoo", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "moas: error:" in err and "unreadable" in err and "Traceback" not in err
    assert json.loads((tmp_path / "logs" / "dataset_report.json").read_text())["skipped"] == len(BAD)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "models").exists()


@pytest.mark.slow
def test_training_on_the_zoo_mixed_with_good_images_completes(tmp_path, monkeypatch):
    make_zoo(tmp_path / "zoo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOAS_DATA_MAX_BAD_FRACTION", "0.5")
    args = ["train", "--config", str(TINY_CONFIG), "--data_dir", "zoo", "--epochs", "1", "--quiet"]
    assert main(args) == 0
    assert (tmp_path / "models" / "best_model.safetensors").is_file()
    assert json.loads((tmp_path / "logs" / "dataset_report.json").read_text())["valid"] == 15
