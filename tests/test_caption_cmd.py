"""``moas caption`` through the real CLI: captions only the uncaptioned images, never overwrites, clear errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from moas.cli import main
from moas.eval.caption import caption_coverage
from moas.eval.tagger import load_or_train_tagger

from .test_tagger import colour_set, validated, write_folder


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("moas: error:")]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err)
    return errors[0]


def test_writes_captions_only_where_none_exist(tmp_path, capsys, monkeypatch):
    # the default trains longer than a test needs
    monkeypatch.setattr("moas.eval.tag_train.auto_epochs", lambda n: 24)
    root = write_folder(tmp_path / "data", 36, captioned=28)
    (root / "img030.txt").write_text("", encoding="utf-8")  # an empty caption file still counts as one
    (root / "img031.caption").write_text("blue background\n", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.suffix in (".txt", ".caption")}
    assert main(["caption", "--data_dir", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "tag model (trained now" in out
    for name, data in before.items():
        assert (root / name).read_bytes() == data  # nothing touched
    assert not (root / "img031.txt").exists()
    new = sorted(p.name for p in root.glob("*.txt") if p.name not in before)
    expected = [f"img{i:03d}.txt" for i in (28, 29, 32, 33, 34, 35)]
    assert set(new) <= set(expected) and len(new) >= 5  # an image with no sure tag may stay uncaptioned
    _, truth = colour_set(36)
    right = sum(truth[int(n[3:6])].split(",")[0].lower() in (root / n).read_text() for n in new)
    assert right >= len(new) - 1  # the background colour is read correctly
    record = json.loads((root / ".moas" / "auto_captions.json").read_text())["captions"]
    assert sorted(record) == sorted(n.replace(".txt", ".png") for n in new)

    # its own captions do not train the tag model, so the folder's tag model is still the one saved
    ds = validated(root)
    assert not load_or_train_tagger(ds, progress=False).trained
    # with one more uncaptioned image, a second run reuses it and writes only that caption
    img, _ = colour_set(1, seed=5)
    Image.fromarray(img[0].permute(1, 2, 0).numpy()).save(root / "extra.png")
    assert main(["caption", "--data_dir", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reused" in out and ("wrote 1 caption file " in out) == (root / "extra.txt").exists()
    assert all((root / n).read_bytes() == data for n, data in before.items())
    (root / "extra.png").unlink()
    (root / "extra.txt").unlink(missing_ok=True)
    assert main(["caption", "--data_dir", str(root), "--quiet"]) == 0
    assert "nothing was written" in capsys.readouterr().out


def test_caption_coverage_counts_tagged_captions():
    assert caption_coverage(["a, b", "", " , ", "c"]) == (2, 4)


def test_user_errors_are_one_sentence(tmp_path, capsys):
    assert main(["caption", "--data_dir", str(tmp_path / "nope")]) != 0
    assert "does not exist" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["caption", "--data_dir", str(tmp_path / "empty")]) != 0
    assert "No images found" in one_error_line(capsys)
    few = write_folder(tmp_path / "few", 12, captioned=3)
    assert main(["caption", "--data_dir", str(few), "--quiet"]) != 0
    assert "Only 3 images" in one_error_line(capsys)
    assert not list(few.glob("img01*.txt"))  # nothing written on failure
    assert main(["caption", "--data_dir", str(few), "--threshold", "1.5"]) != 0
    assert "--threshold" in one_error_line(capsys)


def test_help_explains_what_it_does(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["caption", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "never overwritten" in out and "--threshold" in out and ".moas" in out
