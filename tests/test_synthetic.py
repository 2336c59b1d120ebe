"""Tests for the procedural demo dataset (moas.data.synthetic)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from moas.data import synthetic as syn
from moas.errors import DataError

N, SIZE, SEED = 96, 32, 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    manifest = syn.generate_demo_dataset(out, n_images=N, size=SIZE, seed=SEED, progress=False)
    return out, manifest


def _tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",")]


def test_vocabulary_sizes() -> None:
    assert list(syn.HAIR_COLORS) == ["black", "brown", "blonde", "red", "blue", "pink", "silver", "green"]
    assert set(syn.EYE_COLORS) == {"blue", "red", "green", "purple", "gold", "brown"}
    assert set(syn.BACKGROUNDS) == {"forest", "beach", "night_city", "sakura", "classroom", "sunset"}
    assert {"long", "short", "twintails", "ponytail"} <= set(syn.HAIR_STYLES)
    assert {"artist_a", "artist_b"} <= set(syn.ARTISTS)
    # hair colours must be well separated (min pairwise RGB distance)
    cols = np.array(list(syn.HAIR_COLORS.values()), float)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + np.eye(len(cols)) * 1e9
    assert d.min() > 60


def test_manifest_and_files(demo: tuple[Path, dict]) -> None:
    out, m = demo
    assert m["version"] == 1 and m["seed"] == SEED and m["size"] == SIZE and m["n_images"] == N
    assert len(m["images"]) == N
    assert m["attributes"]["artist"] == ["artist_a", "artist_b"]
    assert m["attributes"]["hair_color"] == list(syn.HAIR_COLORS)
    pngs = sorted(out.glob("train/*/*.png"))
    txts = sorted(out.glob("train/*/*.txt"))
    assert len(pngs) == len(txts) == N
    assert [p.with_suffix("") for p in pngs] == [t.with_suffix("") for t in txts]  # paired by stem
    assert {p.parent.name for p in pngs} == {"artist_a", "artist_b"}
    for entry in m["images"]:
        p = out / entry["file"]
        assert p.is_file()
        assert p.parent.name == entry["artist"]
        assert p.with_suffix(".txt").read_text(encoding="utf-8").strip() == entry["caption"]
    from PIL import Image

    with Image.open(pngs[0]) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"


def test_captions_match_attributes(demo: tuple[Path, dict]) -> None:
    _, m = demo
    positions = Counter()
    for e in m["images"]:
        tags = _tags(e["caption"])
        assert tags[0] == "1girl"
        assert len(tags) == len(set(tags))
        expected = syn.prompt_for(
            e["hair_color"],
            e["eye_color"],
            e["background"],
            e["hair_style"],
            e["accessories"],
            expression=e["expression"],
        )
        assert set(tags) == set(_tags(expected))
        assert f"{e['hair_color']} hair" in tags and f"{e['eye_color']} eyes" in tags
        assert syn.BACKGROUND_TAGS[e["background"]] in tags and syn.STYLE_TAGS[e["hair_style"]] in tags
        assert {"solo", "upper body", "looking at viewer"} <= set(tags)
        assert len(e["accessories"]) <= 2
        positions[tags.index("solo")] += 1
    assert len(positions) >= 5  # the order after 1girl is shuffled per image
    assert "night city" in {syn.BACKGROUND_TAGS[e["background"]] for e in m["images"]}


def test_held_out_pairs() -> None:
    for seed in range(5):
        pairs = syn.held_out_pairs(seed)
        assert len(pairs) == 8
        assert [h for h, _ in pairs] == list(syn.HAIR_COLORS)
        assert {b for _, b in pairs} == set(syn.BACKGROUNDS)
        assert pairs == syn.held_out_pairs(seed)
    assert len({tuple(syn.held_out_pairs(s)) for s in range(5)}) > 1


def test_held_out_never_in_training_and_balance(demo: tuple[Path, dict]) -> None:
    _, m = demo
    held = {(d["hair_color"], d["background"]) for d in m["held_out"]}
    assert held == set(syn.held_out_pairs(SEED))
    assert not any((e["hair_color"], e["background"]) in held for e in m["images"])
    for key, values in (
        ("hair_color", syn.HAIR_COLORS),
        ("eye_color", syn.EYE_COLORS),
        ("hair_style", syn.HAIR_STYLES),
        ("artist", ("artist_a", "artist_b")),
    ):
        counts = Counter(e[key] for e in m["images"])
        assert set(counts) == set(values)
        assert max(counts.values()) - min(counts.values()) <= 1, (key, counts)
    bg = Counter(e["background"] for e in m["images"])
    assert set(bg) == set(syn.BACKGROUNDS) and max(bg.values()) <= 1.6 * min(bg.values())


def test_deterministic_bytes(demo: tuple[Path, dict], tmp_path: Path) -> None:
    out, m = demo
    again = syn.generate_demo_dataset(tmp_path / "same", n_images=12, size=SIZE, seed=SEED, progress=False)
    other = syn.generate_demo_dataset(
        tmp_path / "other", n_images=12, size=SIZE, seed=SEED + 1, progress=False
    )
    assert [e["caption"] for e in again["images"]] == [e["caption"] for e in m["images"][:12]]
    for e in again["images"][:6]:
        assert (tmp_path / "same" / e["file"]).read_bytes() == (out / e["file"]).read_bytes()
    diff = [
        (tmp_path / "other" / e2["file"]).read_bytes() != (out / e1["file"]).read_bytes()
        for e1, e2 in zip(m["images"][:12], other["images"], strict=True)
    ]
    assert sum(diff) >= 10


def test_regenerate_overwrites_and_prunes(tmp_path: Path) -> None:
    syn.generate_demo_dataset(tmp_path, n_images=10, size=16, seed=0, progress=False)
    m = syn.generate_demo_dataset(tmp_path, n_images=4, size=16, seed=0, progress=False)
    assert len(list(tmp_path.glob("train/*/*.png"))) == 4
    assert syn.load_manifest(tmp_path)["n_images"] == 4 == len(m["images"])
    assert not list(tmp_path.glob(".manifest-*"))  # the atomic-write temp file is gone


def test_load_manifest(demo: tuple[Path, dict], tmp_path: Path) -> None:
    out, m = demo
    assert syn.load_manifest(out) == m
    assert syn.load_manifest(out / "train") == m
    with pytest.raises(DataError):
        syn.load_manifest(tmp_path)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError):
        syn.generate_demo_dataset(f, n_images=2, size=16, progress=False)


def test_artists_differ_in_line_weight() -> None:
    dark_a, dark_b = [], []
    for seed in range(4):
        attrs = {
            "hair_color": "blonde",
            "eye_color": "blue",
            "background": "beach",
            "hair_style": "long",
            "accessories": [],
            "expression": "smile",
        }
        for artist, acc in (("artist_a", dark_a), ("artist_b", dark_b)):
            img = np.asarray(syn.draw_character(attrs, 64, artist, random.Random(seed)), float)
            acc.append(float((img.max(axis=2) < 100).mean()))  # fraction of line-dark pixels
    assert np.mean(dark_b) > 1.5 * np.mean(dark_a)


def test_jitter_and_errors() -> None:
    attrs = {"hair_color": "red", "eye_color": "gold", "background": "sunset", "hair_style": "short"}
    a = np.asarray(syn.draw_character(attrs, 48, "artist_a", random.Random(1)))
    b = np.asarray(syn.draw_character(attrs, 48, "artist_a", random.Random(2)))
    c = np.asarray(syn.draw_character(attrs, 48, "artist_a", random.Random(1)))
    assert a.shape == (48, 48, 3) and (a == c).all() and (a != b).any()
    with pytest.raises(DataError):
        syn.draw_character({**attrs, "hair_color": "purple"}, 48, "artist_a", random.Random(0))
    with pytest.raises(DataError):
        syn.draw_character(attrs, 48, "nobody", random.Random(0))
    with pytest.raises(DataError):
        syn.prompt_for("red", "blue", "moon")


def test_prompt_for() -> None:
    p = syn.prompt_for("silver", "purple", "night_city", "twintails", ["glasses", "cat_ears"])
    assert p == syn.prompt_for("silver", "purple", "night_city", "twintails", ["glasses", "cat_ears"])
    assert p.startswith("1girl, solo, silver hair, twintails, purple eyes, night city, glasses, cat ears")
    shuffled = syn.prompt_for("silver", "purple", "night_city", "twintails", rng=random.Random(0))
    assert shuffled.startswith("1girl, ") and set(_tags(shuffled)) <= set(_tags(p))


def test_eval_cases(demo: tuple[Path, dict]) -> None:
    _, m = demo
    cases = syn.eval_cases(m, 16, seed=1)
    assert cases == syn.eval_cases(m, 16, seed=1)
    assert cases != syn.eval_cases(m, 16, seed=2)
    held = {(d["hair_color"], d["background"]) for d in m["held_out"]}
    seen = {(e["hair_color"], e["background"]) for e in m["images"]}
    by_split = Counter(c["split"] for c in cases)
    assert by_split == {"held_out": 16, "seen": 16}
    ho = [c for c in cases if c["split"] == "held_out"]
    assert {(c["hair_color"], c["background"]) for c in ho} == held  # cycles through all 8 pairs
    for c in cases:
        pair = (c["hair_color"], c["background"])
        assert (pair in held) == (c["split"] == "held_out")
        assert c["split"] == "held_out" or pair in seen
        assert c["eye_color"] in syn.EYE_COLORS and c["hair_style"] in syn.HAIR_STYLES
        assert set(_tags(c["prompt"])) >= {f"{c['hair_color']} hair", f"{c['eye_color']} eyes"}
        assert isinstance(c["seed"], int)
    with pytest.raises(DataError):
        syn.eval_cases({"images": []}, 2, 0)


def test_worker_processes_draw_the_same_files_as_one_process(tmp_path, monkeypatch):
    from moas.data import synthetic

    serial = synthetic.generate_demo_dataset(tmp_path / "one", n_images=12, size=32, seed=5, progress=False)
    monkeypatch.setattr(synthetic, "PARALLEL_FROM", 2)  # 12 images: worth a pool now
    pooled = synthetic.generate_demo_dataset(tmp_path / "two", n_images=12, size=32, seed=5, progress=False)
    assert pooled["images"] == serial["images"]
    for entry in serial["images"]:
        for suffix in (".png", ".txt"):
            rel = Path(entry["file"]).with_suffix(suffix)
            assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()
