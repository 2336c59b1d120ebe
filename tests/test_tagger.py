"""The folder tag model: tags, vocabulary, image preparation, training that learns, and the cache next to the data."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from moas.data.dataset import ArtDataset
from moas.errors import DataError
from moas.eval import tagger as tg
from moas.eval.tag_model import TagModel, TagVocab, caption_tags, micro_prf, prepare, resize_images
from moas.eval.tagger import free_threads, load_or_train_tagger, split_indices, train_tag_model

BACKGROUNDS = {
    "red background": (200, 40, 40),
    "green background": (40, 180, 60),
    "blue background": (40, 60, 200),
}
SQUARES = {"white square": (250, 250, 250), "black square": (10, 10, 10)}


def colour_image(bg: str, square: str | None, size: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 (3, size, size): a noisy background colour with, optionally, a coloured square somewhere."""
    img = torch.tensor(BACKGROUNDS[bg], dtype=torch.float32).view(3, 1, 1).repeat(1, size, size)
    if square is not None:
        s = size // 3
        y, x = torch.randint(0, size - s + 1, (2,), generator=gen).tolist()
        img[:, y : y + s, x : x + s] = torch.tensor(SQUARES[square], dtype=torch.float32).view(3, 1, 1)
    img += torch.randn(img.shape, generator=gen) * 12
    return img.round().clamp(0, 255).to(torch.uint8)


def colour_set(n: int, size: int = 24, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Images whose tags are fixed by their colours: one background tag each, a square tag on two thirds."""
    gen = torch.Generator().manual_seed(seed)
    bgs, squares = list(BACKGROUNDS), [None, *SQUARES]
    images, captions = [], []
    for i in range(n):
        bg, sq = bgs[i % 3], squares[(i // 3) % 3]
        images.append(colour_image(bg, sq, size, gen))
        captions.append(", ".join([bg.title() if i % 5 == 0 else bg] + ([sq] if sq else [])))
    return torch.stack(images), captions


def write_folder(root: Path, n: int, size: int = 24, seed: int = 0, captioned: int | None = None) -> Path:
    """``n`` colour images as PNGs under ``root``; the first ``captioned`` (default all) get a .txt caption."""
    images, captions = colour_set(n, size, seed)
    root.mkdir(parents=True, exist_ok=True)
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / f"img{i:03d}.png")
        if captioned is None or i < captioned:
            (root / f"img{i:03d}.txt").write_text(cap + "\n", encoding="utf-8")
    return root


def validated(root: Path) -> ArtDataset:
    ds = ArtDataset(root, resolution=24, cache_dir=None)
    ds.validate(progress=False)
    return ds


def test_caption_tags_normalises_and_dedupes():
    assert caption_tags(" 1girl, Red  Hair ,, red hair, blue eyes ,") == ["1girl", "red hair", "blue eyes"]
    assert caption_tags("") == [] and caption_tags(" , ,") == []


def test_vocab_keeps_frequent_tags_by_count_then_name():
    caps = ["a, b, c", "a, b", "a, c, d", "b, A", "c"]
    vocab = TagVocab.from_captions(caps, min_count=2, max_tags=256)
    assert vocab.tags == ["a", "b", "c"]  # a: 4, b: 3, c: 3 (b before c by name); d: 1 dropped
    assert TagVocab.from_captions(caps, min_count=2, max_tags=2).tags == ["a", "b"]
    assert vocab.encode("C, d, zz, a").tolist() == [1.0, 0.0, 1.0]  # unknown tags are ignored
    assert vocab.encode_many(["a", ""]).shape == (2, 3)


def test_prepare_resizes_any_size_to_model_range():
    flat = torch.full((2, 3, 20, 30), 255, dtype=torch.uint8)
    x = prepare(flat)
    assert x.shape == (2, 3, 64, 64) and torch.allclose(x, torch.ones_like(x))
    mixed = prepare(
        [torch.zeros(3, 16, 16, dtype=torch.uint8), torch.full((3, 100, 80), 128, dtype=torch.uint8)]
    )
    assert mixed.shape == (2, 3, 64, 64)
    assert mixed[0].eq(-1).all() and mixed[1].sub(128 / 127.5 - 1).abs().max() < 1e-6
    # downscaling averages (antialiased): a fine checkerboard becomes mid grey, not aliased stripes
    board = (
        ((torch.arange(128)[:, None] + torch.arange(128)[None]) % 2 * 255)
        .to(torch.uint8)
        .expand(1, 3, 128, 128)
    )
    assert resize_images(board, 16).float().sub(127.5).abs().max() < 2


def test_model_shapes():
    m = TagModel(7)
    x = torch.randn(2, 3, 64, 64)
    assert m.features(x).shape == (2, 128) and m(x).shape == (2, 7)


def test_split_is_seed_fixed_and_holds_out_15_percent():
    tr, ho = split_indices(40, seed=3)
    assert len(ho) == 6 and sorted(tr + ho) == list(range(40))
    assert split_indices(40, seed=3) == (tr, ho) and split_indices(40, seed=4) != (tr, ho)
    assert len(split_indices(10, 0)[1]) >= 1 and split_indices(9, 0)[1] == []


def test_free_threads_stays_within_the_cores():
    assert free_threads(1) == 1  # one thread: nothing to measure
    assert 1 <= free_threads(4, sample_s=0.05) <= 4


def test_micro_prf_counts():
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.4]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    m = micro_prf(probs, labels)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)


def test_training_learns_colour_tags_above_chance():
    images, captions = colour_set(90, size=24, seed=1)
    tagger = train_tag_model(images, captions, seed=0, epochs=24, progress=False)
    m = tagger.metrics["heldout"]
    assert tagger.metrics["n_heldout"] == 14 and len(tagger.vocab) == 5
    assert m["f1"] > 0.85 and m["map"] > 0.9, m
    # fresh images of the same rule: the tagger generalises, and beats always predicting the majority tags
    fresh, fresh_caps = colour_set(30, size=24, seed=99)
    labels = tagger.vocab.encode_many(fresh_caps)
    learned = micro_prf(tagger.predict(fresh), labels)["f1"]
    majority = micro_prf(labels.mean(0, keepdim=True).expand_as(labels) + 0.25, labels)["f1"]
    assert learned > 0.85 and learned > majority + 0.2
    assert tagger.features(fresh[:3]).shape == (3, 128)


def test_training_stops_at_its_step_budget_whatever_the_epochs():
    images, captions = colour_set(90, size=24, seed=1)
    short = train_tag_model(images, captions, seed=0, epochs=24, max_steps=5, progress=False)
    assert short.metrics["steps"] == 5  # not 24 epochs' worth: the budget, whatever the machine's speed
    full = train_tag_model(images, captions, seed=0, epochs=2, max_steps=1000, progress=False)
    assert full.metrics["steps"] == 2 * 5  # 76 training images, batch 16: 5 steps a pass


def test_too_few_captions_or_tags_is_one_clear_error(tmp_path):
    images, captions = colour_set(12)
    with pytest.raises(DataError, match="at least 10"):
        train_tag_model(images[:8], captions[:8], progress=False)
    with pytest.raises(DataError, match="at least 2"):
        train_tag_model(images, ["red background"] * 12, progress=False)
    ds = validated(write_folder(tmp_path / "few", 14, captioned=6))
    with pytest.raises(DataError, match=r"Only 6 images in .*few have captions"):
        load_or_train_tagger(ds, progress=False, epochs=1)


def test_cache_is_reused_then_retrained_when_the_folder_changes(tmp_path, caplog):
    root = write_folder(tmp_path / "data", 30)
    ds = validated(root)
    first = load_or_train_tagger(ds, seed=0, progress=False, epochs=2)
    cache = root / ".moas" / "tag_model.safetensors"
    assert first.trained and first.path == cache and cache.is_file()
    assert sorted(first.train_idx + first.heldout_idx) == list(range(30))
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="moas.eval.tagger"):
        second = load_or_train_tagger(validated(root), seed=0, progress=False, epochs=2)
    assert time.perf_counter() - t0 < 1.0 and not second.trained
    assert any("loaded from" in r.getMessage() for r in caplog.records)
    assert (second.train_idx, second.heldout_idx) == (first.train_idx, first.heldout_idx)
    assert second.vocab.tags == first.vocab.tags and second.metrics == first.metrics
    probe = ds[0]["pixels"][None]
    assert torch.equal(first.predict(probe), second.predict(probe))
    # a changed caption is a changed folder
    (root / "img004.txt").write_text("red background, black square\n", encoding="utf-8")
    assert load_or_train_tagger(validated(root), seed=0, progress=False, epochs=2).trained


def test_corrupt_cache_file_is_logged_and_retrained(tmp_path, caplog):
    root = write_folder(tmp_path / "data", 20)
    ds = validated(root)
    load_or_train_tagger(ds, progress=False, epochs=1)
    cache = root / ".moas" / "tag_model.safetensors"
    for damage in (b"not a safetensors file", cache.read_bytes()[:300]):
        cache.write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moas.eval.tagger"):
            again = load_or_train_tagger(ds, progress=False, epochs=1)
        assert again.trained and any("unreadable" in r.getMessage() for r in caplog.records)
        assert not load_or_train_tagger(ds, progress=False, epochs=1).trained  # the rewritten file loads


def test_unwritable_data_folder_falls_back_to_cache_dir(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data", 20)
    ds = validated(root)
    real_write = tg.atomic_write_bytes

    def refuse_data_folder(path, data):
        if Path(path).is_relative_to(root):
            raise PermissionError(13, "Permission denied")
        real_write(path, data)

    monkeypatch.setattr(tg, "atomic_write_bytes", refuse_data_folder)
    first = load_or_train_tagger(ds, progress=False, cache_dir=tmp_path / "fallback", epochs=1)
    assert first.path is not None and first.path.parent == tmp_path / "fallback"
    assert not (root / ".moas" / "tag_model.safetensors").exists()
    assert not load_or_train_tagger(ds, progress=False, cache_dir=tmp_path / "fallback", epochs=1).trained


def test_machine_written_captions_never_train_the_tagger(tmp_path):
    root = write_folder(tmp_path / "data", 24)
    ds = validated(root)
    caps = ds.captions()
    tg.record_auto_captions(root, {f"img{i:03d}.png": caps[i] for i in range(4)})
    tg.record_auto_captions(root, {"img005.png": "an old guess the user has since rewritten"})
    assert tg.auto_captioned(ds) == {0, 1, 2, 3}
    t = load_or_train_tagger(ds, progress=False, epochs=1)
    used = set(t.train_idx) | set(t.heldout_idx)
    assert used == set(range(4, 24))
