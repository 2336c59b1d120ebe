"""Two-character demo scenes (``moas make-data --scene two``): attributes bound to positions.

Each image shows two girls side by side on one shared background. Each girl has her own hair colour,
hair style and eye colour, and the caption says which girl has which, so a model that only sees the
bag of tags ("red hair", "blonde hair", ...) cannot tell where each colour goes; it has to bind every
attribute to its side.

Layout (fractions of the image; :mod:`moas.eval.binding` measures from the same boxes):

* the left girl is a half-size portrait in the bottom-left quarter (x 0-0.5, y 0.5-1), the right girl
  one in the bottom-right quarter (x 0.5-1, y 0.5-1); each quarter holds the single-character layout of
  :mod:`moas.data.synthetic` at half size, so the hair, eye and background regions of
  :mod:`moas.eval.attributes` apply to each quarter;
* the upper half is background only, so the scene's top corners and side bands still show it.

Caption grammar: ``2girls, <background>, left: <colour> hair, left: <style>, left: <colour> eyes,
right: <colour> hair, right: <style>, right: <colour> eyes``. Every comma-separated tag names its side,
so tag shuffling, tag dropout and the mirror augmentation (which swaps the words "left" and "right")
all leave a true caption; the tag order is fixed only for readability.

Rules: the two girls never share a hair colour nor an eye colour (a shared one could not be bound).
The held-out bindings (:func:`held_out_bindings`) are 8 ordered (left hair, right hair) pairs that never
appear in training: a ring through the 8 hair colours in a seeded order, so every colour is held out
once on each side and the mirrored pair of each held-out pair is seen. Every single tag of a held-out
prompt is therefore in the training set, on that very side; only the combination is new.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from moas.data.synthetic_draw import (
    BACKGROUND_TAGS,
    BACKGROUNDS,
    EXPRESSIONS,
    EYE_COLORS,
    HAIR_COLORS,
    HAIR_STYLES,
    STYLE_TAGS,
    SUPERSAMPLE,
    _check,
    _draw_background,
    draw_character,
)
from moas.data.synthetic_files import DemoWriter, deck
from moas.data.synthetic_panels import remove_stale_sequences
from moas.errors import DataError
from moas.io import atomic_write_bytes

SCENE_TAG = "2girls"
SIDES = ("left", "right")
# x0, y0, x1, y1 as fractions of the image; moas.eval.binding.CHARACTER_BOXES is the measuring copy.
CHARACTER_BOXES = {"left": (0.0, 0.5, 0.5, 1.0), "right": (0.5, 0.5, 1.0, 1.0)}
MIN_SCENE_SIZE = 32  # each girl is drawn at half the side, and draw_character needs >= 16 px
MANIFEST_VERSION = 1


def held_out_bindings(seed: int) -> list[tuple[str, str]]:
    """8 ordered (left hair colour, right hair colour) pairs never shown in training (module docstring)."""
    ring = list(HAIR_COLORS)
    random.Random(f"moas-held-out-bindings:{seed}").shuffle(ring)
    pairs = {ring[k]: ring[(k + 1) % len(ring)] for k in range(len(ring))}
    return [(h, pairs[h]) for h in HAIR_COLORS]


def scene_caption(left: dict, right: dict, background: str) -> str:
    """The caption of a scene (grammar in the module docstring); ``left``/``right`` hold the attributes."""
    _check(background=background)
    tags = [SCENE_TAG, BACKGROUND_TAGS[background]]
    for side, attrs in zip(SIDES, (left, right), strict=True):
        _check(hair_color=attrs["hair_color"], eye_color=attrs["eye_color"], hair_style=attrs["hair_style"])
        tags += [f"{side}: {attrs['hair_color']} hair", f"{side}: {STYLE_TAGS[attrs['hair_style']]}"]
        tags.append(f"{side}: {attrs['eye_color']} eyes")
    return ", ".join(tags)


def parse_scene_caption(caption: str) -> dict:
    """Attributes from a scene caption in any tag order: ``{"left": {...}, "right": {...}, "background"}``."""
    styles = {tag: style for style, tag in STYLE_TAGS.items()}
    backgrounds = {tag: bg for bg, tag in BACKGROUND_TAGS.items()}
    out: dict[str, Any] = {"left": {}, "right": {}}
    for tag in (t.strip() for t in caption.split(",")):
        side, sep, value = tag.partition(": ")
        if tag == SCENE_TAG:
            continue
        if tag in backgrounds:
            out["background"] = backgrounds[tag]
        elif sep and side in SIDES and value.endswith(" hair") and value[:-5] in HAIR_COLORS:
            out[side]["hair_color"] = value[:-5]
        elif sep and side in SIDES and value.endswith(" eyes") and value[:-5] in EYE_COLORS:
            out[side]["eye_color"] = value[:-5]
        elif sep and side in SIDES and value in styles:
            out[side]["hair_style"] = styles[value]
        else:
            raise DataError(f"The tag {tag!r} is not part of the two-character caption grammar.")
    return out


def _check_size(size: int) -> None:
    if size < MIN_SCENE_SIZE or size % 2:
        raise DataError(
            f"Two-character scenes need an even size of at least {MIN_SCENE_SIZE} px, got {size}."
        )


def _character_layer(attrs: dict, side: int, artist: str, draw_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One girl drawn at ``side`` px (uint8 (side, side, 3)) and the mask of her pixels (bool (side, side)).

    draw_character always paints its own background first. Its random stream starts with the three
    jitter draws and then the background (hair style and expression are given, so nothing is drawn
    before the jitter); replaying that prefix on a second stream renders the same background alone,
    and every pixel that differs belongs to the girl (or to her anti-aliased edge)."""
    img = np.asarray(draw_character(attrs, side, artist, random.Random(draw_seed)))
    replay = random.Random(draw_seed)
    for _ in range(3):  # jitter: three rng.uniform calls, one random() each
        replay.random()
    alone = Image.fromarray(_draw_background(attrs["background"], side * SUPERSAMPLE, replay))
    alone_px = np.asarray(alone.resize((side, side), Image.Resampling.LANCZOS))
    mask = (img != alone_px).any(axis=-1)
    k = max(1, side // 16)  # the portrait's top corners are always background
    if mask[:k, :k].any() or mask[:k, -k:].any():
        raise RuntimeError("Background replay no longer matches draw_character's random stream.")
    return img, mask


def draw_scene(
    left: dict, right: dict, background: str, size: int, artist: str, rng: random.Random
) -> Image.Image:
    """Two girls (attribute dicts with hair_color, eye_color, hair_style, expression) on one background.

    Like draw_character, everything is composed at SUPERSAMPLE x the size and downsampled once, so the
    girls' edges against the shared background are anti-aliased like the rest of the picture."""
    _check_size(size)
    big = size * SUPERSAMPLE
    canvas = _draw_background(background, big, rng)  # (big, big, 3)
    for name, attrs in zip(SIDES, (left, right), strict=True):
        x0, y0, x1, y1 = (round(f * big) for f in CHARACTER_BOXES[name])
        layer, mask = _character_layer(
            {**attrs, "background": background}, x1 - x0, artist, rng.randrange(2**31)
        )
        region = canvas[y0:y1, x0:x1]  # a view: writing it paints the canvas
        region[mask] = layer[mask]
    return Image.fromarray(canvas).resize((size, size), Image.Resampling.LANCZOS)


def write_two_character_scenes(
    out: Path, n_images: int, size: int, seed: int, artists: Sequence[str], progress: bool = False
) -> list[dict]:
    """Write ``out/train/<artist>/<NNNNN>.png|.txt`` scenes; return their manifest entries.

    The (left hair, right hair) pairs cycle through every pair except the held-out ones, the (left eye,
    right eye) pairs through every ordered pair of two different colours."""
    _check_size(size)
    held = set(held_out_bindings(seed))
    plan = random.Random(f"moas-scene-plan:{seed}")
    hair_deck = deck([p for p in permutations(HAIR_COLORS, 2) if p not in held], plan)
    eye_deck = deck(list(permutations(EYE_COLORS, 2)), plan)
    style_deck, bg_deck = deck(HAIR_STYLES, plan), deck(BACKGROUNDS, plan)
    artist_deck = deck(artists, plan)
    writer = DemoWriter(out, n_images, artists)
    images = []
    for i in writer.indices(n_images, progress, "two-character scenes"):
        rng = random.Random(f"moas-scene-img:{seed}:{i}")  # per image: output is independent of n_images
        hairs, eyes, background, artist = next(hair_deck), next(eye_deck), next(bg_deck), next(artist_deck)
        left, right = (
            {
                "hair_color": h,
                "eye_color": e,
                "hair_style": next(style_deck),
                "expression": rng.choice(EXPRESSIONS),
            }
            for h, e in zip(hairs, eyes, strict=True)
        )
        img = draw_scene(left, right, background, size, artist, rng)
        caption = scene_caption(left, right, background)
        file = writer.save(i, artist, img, caption)
        images.append({"file": file, "left": left, "right": right, "background": background,
                       "artist": artist, "caption": caption})  # fmt: skip
    writer.remove_stale()
    return images


def generate_two_character_dataset(
    out: Path, n_images: int, size: int, seed: int, artists: Sequence[str], progress: bool
) -> dict:
    """Scenes + ``out/manifest.json`` (``"scene": "two"``); called by ``generate_demo_dataset``."""
    images = write_two_character_scenes(out, n_images, size, seed, artists, progress)
    remove_stale_sequences(out, artists, set())  # single-character panels of an earlier run
    vocab = {"hair_color": HAIR_COLORS, "hair_style": HAIR_STYLES, "eye_color": EYE_COLORS}
    vocab |= {"background": BACKGROUNDS, "artist": artists}
    manifest: dict[str, Any] = {"version": MANIFEST_VERSION, "scene": "two", "seed": seed, "size": size}
    manifest["n_images"] = n_images
    manifest["attributes"] = {k: list(v) for k, v in vocab.items()}
    manifest["held_out_bindings"] = [
        {"left_hair_color": lh, "right_hair_color": rh} for lh, rh in held_out_bindings(seed)
    ]
    manifest["images"] = images
    # Atomic: readers never see a half-written manifest.
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1).encode("utf-8"))
    return manifest


def binding_eval_cases(manifest: dict, n_per_split: int, seed: int) -> list[dict]:
    """``n_per_split`` prompts with held-out (left hair, right hair) bindings and as many with seen ones.

    Each case has ``split``, ``prompt``, the ground truth ``left`` / ``right`` (hair_color, eye_color,
    hair_style) and ``background``, and a sampling ``seed``."""
    if manifest.get("scene") != "two":
        raise DataError(
            "This demo set is not a two-character one; make one with 'moas make-data --scene two'."
        )
    try:
        held = [(d["left_hair_color"], d["right_hair_color"]) for d in manifest["held_out_bindings"]]
        trained = {(d["left"]["hair_color"], d["right"]["hair_color"]) for d in manifest["images"]}
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"The manifest is missing the field {exc} needed for the binding evaluation."
        ) from exc
    seen = sorted(trained - set(held))
    if not held or not seen:
        raise DataError("The manifest has no held-out or no seen (left hair, right hair) bindings.")
    rng = random.Random(f"moas-binding-eval:{seed}")
    rng.shuffle(held)
    rng.shuffle(seen)
    cases = []
    for split, pairs in (("held_out", held), ("seen", seen)):
        for k in range(n_per_split):  # cycle so that every held-out binding is evaluated
            eyes = rng.sample(list(EYE_COLORS), 2)
            left, right = (
                {"hair_color": h, "eye_color": e, "hair_style": rng.choice(HAIR_STYLES)}
                for h, e in zip(pairs[k % len(pairs)], eyes, strict=True)
            )
            background = rng.choice(BACKGROUNDS)
            case = {"split": split, "prompt": scene_caption(left, right, background), "left": left}
            case |= {"right": right, "background": background, "seed": rng.randrange(2**31)}
            cases.append(case)
    return cases
