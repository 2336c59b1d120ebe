"""Quality filters and ``moas prepare``: thresholds from the original, reports, moving rejects safely."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from moas.cli import main
from moas.data.filters import QualityThresholds, quality_reason


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_quality_reasons_follow_the_original_thresholds():
    t = QualityThresholds()
    assert quality_reason(_noise(512, 256), t) is None
    assert quality_reason(_noise(511, 300), t) == "too_small"  # long edge < 512
    assert quality_reason(_noise(600, 255), t) == "too_small"  # short edge < 256
    assert quality_reason(_noise(1600, 500), t) == "bad_aspect"  # 3.2 > 3.0
    assert quality_reason(Image.new("RGB", (512, 512), (90, 90, 90)), t) == "low_color_variance"
    ramp = np.tile(np.linspace(0, 255, 512, dtype=np.float64), (512, 1))  # smooth: no detail
    rgb = np.stack([ramp, ramp[::-1], ramp], -1).astype(np.uint8)
    assert quality_reason(Image.fromarray(rgb), t) == "blurry"
    # Colourful (R against G) and sharp, but the grey level only varies by ±10: low contrast.
    rng = np.random.default_rng(0)
    r = rng.integers(0, 256, (512, 512)).astype(np.float64)
    grey = 128 + 10 * ((np.indices((512, 512)).sum(0) % 2) * 2 - 1)  # fine checkerboard
    g = (grey - 0.299 * r - 0.114 * 128) / 0.587
    img = np.stack([r, g, np.full_like(r, 128)], -1).round().clip(0, 255).astype(np.uint8)
    assert quality_reason(Image.fromarray(img), t) == "low_contrast"
    # Near-white line art with only a couple of colours: too few unique colours.
    art = np.full((512, 512, 3), 255, np.uint8)
    art[::3, :] = 0
    assert quality_reason(Image.fromarray(art), QualityThresholds(near_extreme=100)) == "too_few_colors"


def test_prepare_reports_and_moves_rejects_without_deleting(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    _noise(64, 48, 1).save(data / "good.png")
    _noise(64, 48, 1).save(data / "sub" / "copy.png")  # same bytes: duplicate
    (data / "sub" / "copy.txt").write_text("caption of the copy")
    _noise(20, 10, 2).save(data / "tiny.png")
    (data / "page.jpg").write_text("<html>nope</html>")
    monkeypatch.chdir(tmp_path)
    args = ["prepare", "--data_dir", "data", "--min_long_edge", "48", "--min_short_edge", "32", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 of 4 images pass" in out
    report = json.loads((tmp_path / "logs" / "prepare_report.json").read_text())
    assert report["by_reason"] == {"duplicate": 1, "not_an_image": 1, "too_small": 1}
    assert len(list(data.rglob("*.*"))) == 5  # report only: nothing moved
    assert main([*args, "--move_rejects", "rejected"]) == 0
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*.*")) == ["good.png"]
    moved = sorted(
        p.relative_to(tmp_path / "rejected").as_posix() for p in (tmp_path / "rejected").rglob("*.*")
    )
    assert moved == ["page.jpg", "sub/copy.png", "sub/copy.txt", "tiny.png"]
    assert main([*args, "--move_rejects", "data/inside"]) != 0
    assert "outside --data_dir" in capsys.readouterr().err
    assert main(["prepare", "--data_dir", str(Path("missing"))]) != 0
