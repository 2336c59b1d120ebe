import logging

import pytest
import torch
from PIL import Image

from moas.data import dataset as ds
from moas.data.dataset import ArtDataset, collate, read_caption, to_model_range, to_uint8
from moas.errors import DataError


def _img(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_init_is_lazy_and_captions_pair_by_stem(tmp_path, monkeypatch):
    _img(tmp_path / "a" / "one.png", (255, 0, 0))
    (tmp_path / "a" / "one.txt").write_text("1girl,  red hair\n")
    _img(tmp_path / "two.jpg", (0, 255, 0))
    calls = []
    monkeypatch.setattr(ds, "load_image", lambda p: calls.append(p) or Image.open(p).convert("RGB"))
    d = ArtDataset(tmp_path, 16, tmp_path / "cache")
    assert len(d) == 2 and calls == []  # nothing decoded in __init__
    assert sorted(d.captions()) == ["", "1girl, red hair"]
    item = d[[p.name for p in d.paths].index("one.png")]
    assert item["pixels"].shape == (3, 16, 16) and item["pixels"].dtype == torch.uint8
    assert item["pixels"][0].float().mean() > 250 and item["caption"] == "1girl, red hair"


def test_cache_reused_rebuilt_when_corrupt_and_keyed_by_content(tmp_path, monkeypatch, caplog):
    img = _img(tmp_path / "data" / "x.png", (10, 20, 30))
    cache = tmp_path / "cache"
    d = ArtDataset(tmp_path / "data", 16, cache)
    first = d[0]["pixels"]
    entries = list(cache.glob("*.pt"))
    assert len(entries) == 1
    calls = []
    monkeypatch.setattr(ds, "load_image", lambda p: calls.append(p) or Image.open(p).convert("RGB"))
    assert torch.equal(d[0]["pixels"], first) and calls == []  # served from the cache
    entries[0].write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        assert torch.equal(d[0]["pixels"], first)
    assert "corrupt" in caplog.text and len(calls) == 1
    _img(img, (200, 20, 30))  # edit the image: a new entry, new pixels
    assert d[0]["pixels"][0, 0, 0] == 200 and len(list(cache.glob("*.pt"))) == 2
    assert ArtDataset(tmp_path / "data", 24, cache)[0]["pixels"].shape[-1] == 24  # new setting, new entry


def test_validate_skips_bad_files_and_stops_when_nothing_usable(tmp_path, caplog):
    _img(tmp_path / "good.png", (1, 2, 3))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    d = ArtDataset(tmp_path, 16, None)
    with caplog.at_level(logging.WARNING):
        d.validate(max_bad_fraction=0.6, progress=False)
    assert [p.name for p in d.paths] == ["good.png"] and d.skipped[0][0].name == "bad.png"
    with pytest.raises(DataError, match="unreadable"):
        ArtDataset(tmp_path, 16, None).validate(max_bad_fraction=0.2, progress=False)
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "page.png").write_text("<html>not an image</html>")
    with pytest.raises(DataError, match="None of the 1 image files"):
        ArtDataset(only_bad, 16, None).validate(progress=False)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ArtDataset(tmp_path / "nope", 16)
    (tmp_path / "notes.md").write_text("no images here")
    with pytest.raises(DataError, match="No images found"):
        ArtDataset(tmp_path, 16, None).validate(progress=False)


def test_caption_encodings(tmp_path, caplog):
    p = _img(tmp_path / "a.png", (0, 0, 0))
    p.with_suffix(".txt").write_bytes("caf\xe9, smile".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        assert read_caption(p) == "café, smile"
    assert "not UTF-8" in caplog.text
    p.with_suffix(".txt").unlink()
    p.with_suffix(".caption").write_text("1girl")
    assert read_caption(p) == "1girl"


def test_collate_and_ranges():
    items = [
        {"pixels": torch.full((3, 4, 4), v, dtype=torch.uint8), "caption": c, "index": i}
        for i, (v, c) in enumerate([(0, "a"), (255, "b")])
    ]
    b = collate(items)
    assert b["pixels"].shape == (2, 3, 4, 4) and b["captions"] == ["a", "b"]
    x = to_model_range(b["pixels"])
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), b["pixels"])
