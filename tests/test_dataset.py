import logging

import pytest
import torch
from PIL import Image

from moas.config import load_config
from moas.data import dataset as ds
from moas.data.captions import caption_from_names
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


@pytest.mark.parametrize(
    "text, tags",
    [
        ("1girl long_hair blue_eyes ^_^\n", "1girl, long hair, blue eyes, ^_^"),  # booru: spaces, underscores
        ("1girl, long_hair, school_uniform", "1girl, long hair, school uniform"),
        ("1girl, long hair, forest", "1girl, long hair, forest"),  # already moas's form
        ("a girl standing in a forest at night", "a girl standing in a forest at night"),  # a sentence
    ],
)
def test_booru_style_tag_files_become_comma_separated_tags(tmp_path, text, tags):
    p = _img(tmp_path / "a.png", (0, 0, 0))
    p.with_suffix(".txt").write_text(text)
    assert read_caption(p) == tags


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


@pytest.mark.parametrize(
    "name, caption",
    [
        ("elves/elvish_archer-2.png", "elves, elvish archer"),
        ("Hatsune Miku/miku (3).png", "hatsune miku, miku"),
        ("IMG_2031.jpg", ""),  # a camera's name says nothing
        ("a1b2c3d4e5f6a7b8.png", ""),  # nor a content hash
        ("humans/transparent/mage-red.png", "humans, mage red"),
    ],
)
def test_a_caption_from_folder_and_file_names(tmp_path, name, caption):
    assert caption_from_names(tmp_path / name, tmp_path) == caption


def test_images_without_a_caption_file_are_captioned_from_their_names_when_asked(tmp_path):
    _img(tmp_path / "elves" / "archer.png", (255, 0, 0))
    _img(tmp_path / "humans" / "mage.png", (0, 255, 0)).with_suffix(".txt").write_text("1boy, robe")
    _img(tmp_path / "orcs" / "grunt.png", (0, 0, 255)).with_suffix(".txt").write_text("")  # the user's file
    named = ArtDataset(tmp_path, 16, None, captions_from_names=True)
    named.validate(progress=False)
    by_name = dict(zip((p.stem for p in named.paths), named.captions(), strict=True))
    assert by_name == {"archer": "elves, archer", "mage": "1boy, robe", "grunt": ""}
    plain = ArtDataset(tmp_path, 16, None)
    assert sorted(plain.captions()) == ["", "", "1boy, robe"]
    assert load_config(
        "cpu_tiny", use_env=False
    ).data.captions_from_names  # on by default (config.py says why)


def test_images_below_the_training_size_are_upscaled_with_a_note_or_skipped(tmp_path, caplog):
    _img(tmp_path / "big.png", (255, 0, 0), size=(40, 40))
    _img(tmp_path / "small.png", (0, 255, 0), size=(20, 40))  # narrower than the 32-px training side
    with caplog.at_level(logging.INFO):
        kept = ArtDataset(tmp_path, 32, None)
        report = kept.validate(progress=False)
    assert len(kept) == 2 and report["upscaled"] == 1 and "1 of 2 images are smaller" in caplog.text
    skipping = ArtDataset(tmp_path, 32, None, small_images="skip")
    report = skipping.validate(progress=False)
    assert [p.name for p in skipping.paths] == ["big.png"] and report["upscaled"] == 0
    assert report["by_reason"] == {"smaller than the training size": 1}
    assert "20x40 is smaller than the 32x32 training size" in skipping.skipped_detail[0]
    with pytest.raises(DataError, match="data.small_images"):
        ArtDataset(tmp_path, 32, None, small_images="crop")
