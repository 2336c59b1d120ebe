"""Tests for the generator-independent attribute measurement (moas.eval.attributes)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from moas.data import synthetic as syn
from moas.errors import DataError
from moas.eval import attributes as attr

ATTRS = ("hair_color", "eye_color", "background")


def _render(n: int, size: int, seed: int) -> list[tuple[dict, Image.Image]]:
    """Fresh images (not the prototype renders): balanced values, random everything else, all artists."""
    rng = random.Random(f"test-attributes:{seed}")
    hairs, eyes = list(syn.HAIR_COLORS), list(syn.EYE_COLORS)
    out = []
    for i in range(n):
        attrs = {
            "hair_color": hairs[i % 8],
            "eye_color": eyes[(i // 8 + i) % 6],
            "background": syn.BACKGROUNDS[rng.randrange(6)],
            "hair_style": rng.choice(syn.HAIR_STYLES),
            "accessories": rng.sample(syn.ACCESSORIES, rng.randint(0, 2)),
        }
        out.append((attrs, syn.draw_character(attrs, size, syn.ARTISTS[i % 3], rng)))
    return out


def prototype_renders():
    """The renders the stored prototypes are measured on: per artist, 24 characters (each hair colour 3×,
    each eye colour and background 4×) at 64 px, reduced to 32 px, and that reduction blurred."""
    rng = random.Random("moas-attribute-prototypes")
    hairs, eyes, bgs = list(syn.HAIR_COLORS), list(syn.EYE_COLORS), list(syn.BACKGROUNDS)
    for artist in syn.ARTISTS:
        for i in range(24):  # 24 = lcm(8, 6)
            attrs = {
                "hair_color": hairs[i % 8],
                "background": bgs[i % 6],
                "eye_color": eyes[(i + i // 6) % 6],
                "hair_style": syn.HAIR_STYLES[i % 4],
                "accessories": rng.sample(syn.ACCESSORIES, rng.randint(0, 2)),
            }
            full = syn.draw_character(attrs, attr.CANON, artist, rng)
            small = full.resize((attr.CANON // 2, attr.CANON // 2), Image.Resampling.LANCZOS)
            yield attrs, artist, "64", full
            yield attrs, artist, "32", small
            yield attrs, artist, "32blur", small.filter(ImageFilter.GaussianBlur(0.8))


def test_stored_prototypes_are_the_ones_the_demo_renders_give():
    """The measurement ships its prototypes; re-measured from the drawer they must be the same (re-save
    them with ``python -m tests.test_attributes`` after a change to the drawer)."""
    fresh = attr.prototype_groups(prototype_renders())
    stored = attr._prototypes()
    assert fresh.keys() == stored.keys()
    for kind, (feats, labels) in fresh.items():
        assert labels == stored[kind][1], kind
        np.testing.assert_allclose(stored[kind][0], feats, rtol=0, atol=1e-4, err_msg=kind)
    assert attr.EYE_CENTRES == syn.EYES  # the layout the measurement reads is the drawer's


def _accuracy(data: list[tuple[dict, Image.Image]], transform=lambda im: im) -> dict[str, float]:
    preds = [attr.measure_attributes(transform(im)) for _, im in data]
    return {a: float(np.mean([p[a] == t[a] for (t, _), p in zip(data, preds, strict=True)])) for a in ATTRS}


@pytest.fixture(scope="module", params=[32, 64])
def fresh(request: pytest.FixtureRequest) -> list[tuple[dict, Image.Image]]:
    return _render(150, request.param, seed=1000 + request.param)


def test_clean_accuracy(fresh: list[tuple[dict, Image.Image]]) -> None:
    acc = _accuracy(fresh)
    assert all(v >= 0.97 for v in acc.values()), acc


def test_noisy_blurred_accuracy(fresh: list[tuple[dict, Image.Image]]) -> None:
    noise = np.random.default_rng(0)

    def degrade(im: Image.Image) -> np.ndarray:
        a = np.asarray(im.filter(ImageFilter.GaussianBlur(0.5 * im.width / 32)), np.float32)
        return np.clip(a + noise.normal(0.0, 12.0, a.shape), 0, 255).astype(np.uint8)

    acc = _accuracy(fresh, degrade)
    assert all(v >= 0.9 for v in acc.values()), acc


def test_other_sizes_and_inputs() -> None:
    attrs = {
        "hair_color": "pink",
        "eye_color": "green",
        "background": "classroom",
        "hair_style": "ponytail",
        "accessories": ["glasses"],
    }
    img = syn.draw_character(attrs, 96, "artist_b", random.Random(5))
    for x in (img, np.asarray(img), img.resize((48, 48), Image.Resampling.LANCZOS), img.convert("RGBA")):
        p = attr.measure_attributes(x)
        assert {a: p[a] for a in ATTRS} == {a: attrs[a] for a in ATTRS}
        assert p["hair_distance"] >= 0 and p["eye_margin"] > 0
    with pytest.raises(DataError):
        attr.measure_attributes(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(DataError):
        attr.measure_attributes(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(DataError):
        attr.measure_attributes(np.zeros((32, 32), np.uint8))


def test_nonsense_images_give_valid_names() -> None:
    clean = attr.measure_attributes(_render(1, 64, seed=7)[0][1])
    for x in (
        np.full((40, 40, 3), 128, np.uint8),
        np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8),
    ):
        p = attr.measure_attributes(x)
        assert p["hair_color"] in syn.HAIR_COLORS
        assert p["eye_color"] in syn.EYE_COLORS
        assert p["background"] in syn.BACKGROUNDS
        assert p["background_distance"] > clean["background_distance"]


def test_rgb_to_lab_reference_values() -> None:
    lab = attr.rgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], np.uint8))
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.5)
    np.testing.assert_allclose(lab[1], [0, 0, 0], atol=0.5)
    np.testing.assert_allclose(lab[2], [53.2, 80.1, 67.2], atol=1.0)


def test_attribute_accuracy_and_table() -> None:
    cases = [
        {"split": "held_out", "hair_color": "red", "eye_color": "blue", "background": "forest"},
        {"split": "held_out", "hair_color": "pink", "eye_color": "gold", "background": "beach"},
        {"split": "seen", "hair_color": "black", "eye_color": "red", "background": "sunset"},
    ]
    preds = [
        {"hair_color": "red", "eye_color": "blue", "background": "beach"},
        {"hair_color": "red", "eye_color": "gold", "background": "beach"},
        {"hair_color": "black", "eye_color": "red", "background": "sunset"},
    ]
    r = attr.attribute_accuracy(cases, preds)
    assert r["held_out"] == {
        "hair_color": 0.5,
        "eye_color": 1.0,
        "background": 0.5,
        "mean": pytest.approx(2 / 3),
    }
    assert r["seen"]["mean"] == 1.0
    assert r["n"] == {"held_out": 2, "seen": 1}
    table = attr.format_accuracy_table(r)
    lines = table.splitlines()
    assert lines[0].split() == ["split", "hair_color", "eye_color", "background", "mean", "n"]
    assert lines[2].split()[:5] == ["held_out", "0.500", "1.000", "0.500", "0.667"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    # callers (moas eval) add extra keys to the result; the table must skip them
    extended = {**r, "seconds": 1.5, "settings": {"steps": 20}, "cases": []}
    assert attr.format_accuracy_table(extended) == table
    with pytest.raises(DataError):
        attr.attribute_accuracy(cases, preds[:2])


def test_eval_cases_roundtrip() -> None:
    """Rendering eval_cases prompts' attributes and measuring them recovers the case labels."""
    manifest = {
        "held_out": [{"hair_color": h, "background": b} for h, b in syn.held_out_pairs(0)],
        "images": [
            {"hair_color": h, "background": b}
            for h in syn.HAIR_COLORS
            for b in syn.BACKGROUNDS
            if (h, b) not in syn.held_out_pairs(0)
        ],
    }
    cases = syn.eval_cases(manifest, 8, seed=0)
    preds = [
        attr.measure_attributes(syn.draw_character(c, 32, "artist_c", random.Random(c["seed"])))
        for c in cases
    ]
    r = attr.attribute_accuracy(cases, preds)
    assert r["held_out"]["mean"] >= 0.95 and r["seen"]["mean"] >= 0.95, r


if __name__ == "__main__":  # re-measure and store the prototypes
    attr.save_prototypes(attr.prototype_groups(prototype_renders()))
