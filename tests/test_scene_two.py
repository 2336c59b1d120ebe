"""Two-character demo scenes (moas.data.synthetic_scene) and their measurer (moas.eval.binding)."""

from __future__ import annotations

import random
from collections import Counter
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moas.data import synthetic as syn
from moas.data import synthetic_scene as scene
from moas.data.augment import swap_sides
from moas.errors import DataError
from moas.eval import binding

N, SIZE, SEED = 24, 64, 0


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("two")
    manifest = syn.generate_demo_dataset(out, n_images=N, size=SIZE, seed=SEED, progress=False, scene="two")
    return out, manifest


def _pixels(out: Path, entry: dict) -> np.ndarray:
    return np.asarray(Image.open(out / entry["file"]).convert("RGB"))


def _truth(entry: dict) -> dict:
    keys = ("hair_color", "eye_color", "hair_style")
    sides = {side: {k: entry[side][k] for k in keys} for side in scene.SIDES}
    return {**sides, "background": entry["background"]}


def test_held_out_bindings_are_a_ring_through_the_hair_colours() -> None:
    held = scene.held_out_bindings(SEED)
    assert held == scene.held_out_bindings(SEED)
    assert held != scene.held_out_bindings(SEED + 1)
    assert len(held) == len(syn.HAIR_COLORS) == 8
    # every colour held out exactly once on each side, never against itself
    assert sorted(h for h, _ in held) == sorted(syn.HAIR_COLORS)
    assert sorted(h for _, h in held) == sorted(syn.HAIR_COLORS)
    assert all(a != b for a, b in held)
    # the mirrored binding of every held-out pair is trainable: only the side assignment is new
    assert not {(b, a) for a, b in held} & set(held)


def test_manifest_captions_and_files_agree(two: tuple[Path, dict]) -> None:
    out, manifest = two
    assert manifest["scene"] == "two" and manifest["n_images"] == N and manifest["size"] == SIZE
    assert len(manifest["images"]) == N
    for entry in manifest["images"]:
        assert (out / entry["file"]).read_bytes()[:4] == b"\x89PNG"
        caption = (out / entry["file"]).with_suffix(".txt").read_text(encoding="utf-8")
        assert caption == entry["caption"] + "\n"
        assert caption.startswith("2girls, ")
        assert scene.parse_scene_caption(entry["caption"]) == _truth(entry)
        assert entry["left"]["hair_color"] != entry["right"]["hair_color"]
        assert entry["left"]["eye_color"] != entry["right"]["eye_color"]
        assert Image.open(out / entry["file"]).size == (SIZE, SIZE)
    assert {e["artist"] for e in manifest["images"]} == {"artist_a", "artist_b"}


def test_caption_grammar_survives_shuffling_and_mirroring() -> None:
    left = {"hair_color": "red", "eye_color": "blue", "hair_style": "long"}
    right = {"hair_color": "blonde", "eye_color": "green", "hair_style": "twintails"}
    caption = scene.scene_caption(left, right, "night_city")
    assert caption == (
        "2girls, night city, left: red hair, left: long hair, left: blue eyes, "
        "right: blonde hair, right: twintails, right: green eyes"
    )
    tags = caption.split(", ")
    random.Random(0).shuffle(tags)  # what data.shuffle_tags does: the binding is in each tag
    assert scene.parse_scene_caption(", ".join(tags)) == scene.parse_scene_caption(caption)
    mirrored = scene.parse_scene_caption(swap_sides(caption))  # the flip augmentation's caption
    assert mirrored["left"] == right and mirrored["right"] == left
    with pytest.raises(DataError, match="grammar"):
        scene.parse_scene_caption("2girls, forest, red hair")


def test_held_out_bindings_never_trained_but_evaluated(two: tuple[Path, dict]) -> None:
    _, manifest = two
    held = {(d["left_hair_color"], d["right_hair_color"]) for d in manifest["held_out_bindings"]}
    assert held == set(scene.held_out_bindings(SEED))
    trained = {(e["left"]["hair_color"], e["right"]["hair_color"]) for e in manifest["images"]}
    assert not trained & held
    cases = scene.binding_eval_cases(manifest, n_per_split=8, seed=5)
    assert [c["split"] for c in cases] == ["held_out"] * 8 + ["seen"] * 8
    got = {"held_out": set(), "seen": set()}
    for c in cases:
        got[c["split"]].add((c["left"]["hair_color"], c["right"]["hair_color"]))
        parsed = scene.parse_scene_caption(c["prompt"])
        assert parsed == {"left": c["left"], "right": c["right"], "background": c["background"]}
        assert c["left"]["eye_color"] != c["right"]["eye_color"]
    assert got["held_out"] == held
    assert got["seen"] <= trained
    assert cases == scene.binding_eval_cases(manifest, n_per_split=8, seed=5)


def test_training_pairs_cycle_through_every_seen_binding(tmp_path: Path) -> None:
    # 56 ordered pairs of different colours - 8 held out = 48: 48 images show each exactly once, so every
    # colour is trained 6 times on each side, including the sides its held-out bindings ask for.
    m = syn.generate_demo_dataset(tmp_path, n_images=48, size=32, seed=SEED, progress=False, scene="two")
    pairs = [(e["left"]["hair_color"], e["right"]["hair_color"]) for e in m["images"]]
    held = set(scene.held_out_bindings(SEED))
    assert sorted(pairs) == sorted(p for p in permutations(syn.HAIR_COLORS, 2) if p not in held)
    for side in (0, 1):
        assert Counter(p[side] for p in pairs) == {h: 6 for h in syn.HAIR_COLORS}


def test_same_seed_gives_identical_files(two: tuple[Path, dict], tmp_path: Path) -> None:
    out, manifest = two
    again = syn.generate_demo_dataset(tmp_path, n_images=N, size=SIZE, seed=SEED, progress=False, scene="two")
    assert again == manifest
    assert (tmp_path / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    for entry in manifest["images"]:
        for suffix in (".png", ".txt"):
            rel = Path(entry["file"]).with_suffix(suffix)
            assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes()


def test_switching_scenes_in_one_folder_and_errors(tmp_path: Path) -> None:
    syn.generate_demo_dataset(tmp_path, n_images=6, size=32, seed=1, progress=False, sequences=1)
    two = syn.generate_demo_dataset(tmp_path, n_images=2, size=32, seed=1, progress=False, scene="two")
    files = sorted(p.name for p in (tmp_path / "train").rglob("*.png"))
    assert files == ["00000.png", "00001.png"]  # stale single-character images and panels are gone
    with pytest.raises(DataError, match="two-character"):
        syn.eval_cases(two, 4, 0)
    one = syn.generate_demo_dataset(tmp_path, n_images=2, size=32, seed=1, progress=False)
    assert "scene" not in one  # scene "one" keeps the manifest it always had
    with pytest.raises(DataError, match="not a two-character"):
        scene.binding_eval_cases(one, 4, 0)
    with pytest.raises(DataError, match="Unknown scene"):
        syn.generate_demo_dataset(tmp_path, n_images=2, size=32, progress=False, scene="three")
    with pytest.raises(DataError, match="sequences"):
        syn.generate_demo_dataset(tmp_path, n_images=2, size=32, progress=False, scene="two", sequences=1)
    with pytest.raises(DataError, match="even size"):
        syn.generate_demo_dataset(tmp_path, n_images=2, size=34 + 1, progress=False, scene="two")


def test_measurer_recovers_each_characters_attributes(two: tuple[Path, dict]) -> None:
    out, manifest = two
    assert binding.CHARACTER_BOXES == scene.CHARACTER_BOXES
    cases = [{"split": "all", **_truth(e)} for e in manifest["images"]]
    preds = [binding.measure_characters(_pixels(out, e)) for e in manifest["images"]]
    acc = binding.binding_accuracy(cases, preds)["all"]
    for col in ("left_hair_color", "right_hair_color", "left_eye_color", "right_eye_color", "background"):
        assert acc[col] >= 0.9, (col, acc)
    assert acc["both_bound"] >= 0.9 and acc["hair_swapped"] == 0.0
    assert all(p["left"]["hair_distance"] < 20 for p in preds)  # they look like the demo set


def test_swapping_the_halves_swaps_the_measurement(two: tuple[Path, dict]) -> None:
    out, manifest = two
    for entry in manifest["images"][:6]:
        px = _pixels(out, entry)
        swapped = np.concatenate([px[:, SIZE // 2 :], px[:, : SIZE // 2]], axis=1)
        a, b = binding.measure_characters(px), binding.measure_characters(swapped)
        for attr in binding.CHARACTER_ATTRIBUTES:
            assert (b["left"][attr], b["right"][attr]) == (a["right"][attr], a["left"][attr])
            assert a["left"][attr] == entry["left"][attr]


def test_small_scenes_are_upscaled_before_measuring(tmp_path: Path) -> None:
    m = syn.generate_demo_dataset(tmp_path, n_images=4, size=32, seed=2, progress=False, scene="two")
    for entry in m["images"]:
        got = binding.measure_characters(Image.open(tmp_path / entry["file"]))
        assert got["left"]["hair_color"] == entry["left"]["hair_color"]
        assert got["right"]["hair_color"] == entry["right"]["hair_color"]


def test_binding_accuracy_pinned_values() -> None:
    def char(hair: str, eye: str) -> dict:
        return {"hair_color": hair, "eye_color": eye}

    cases = [
        {
            "split": "held_out",
            "left": char("red", "blue"),
            "right": char("green", "gold"),
            "background": "beach",
        },
        {
            "split": "held_out",
            "left": char("pink", "red"),
            "right": char("black", "blue"),
            "background": "forest",
        },
        {"split": "seen", "left": char("red", "blue"), "right": char("blue", "red"), "background": "sakura"},
    ]
    preds = [
        {"left": char("red", "blue"), "right": char("green", "gold"), "background": "beach"},  # all right
        {"left": char("black", "red"), "right": char("pink", "blue"), "background": "beach"},  # hair swapped
        {"left": char("red", "blue"), "right": char("blue", "gold"), "background": "sakura"},  # one eye wrong
    ]
    r = binding.binding_accuracy(cases, preds)
    assert r["n"] == {"held_out": 2, "seen": 1}
    assert r["held_out"]["left_hair_color"] == 0.5 and r["held_out"]["left_eye_color"] == 1.0
    assert r["held_out"]["hair_bound"] == 0.5 and r["held_out"]["hair_swapped"] == 0.5
    assert r["held_out"]["both_bound"] == 0.5 and r["held_out"]["background"] == 0.5
    assert r["held_out"]["mean"] == pytest.approx(0.75)
    assert r["seen"]["hair_bound"] == 1.0 and r["seen"]["both_bound"] == 0.0
    assert r["seen"]["right_eye_color"] == 0.0 and r["seen"]["mean"] == pytest.approx(0.75)
    with pytest.raises(DataError, match="predictions"):
        binding.binding_accuracy(cases, preds[:2])
