"""Procedural anime-portrait demo dataset with controllable, captioned attributes.

Every image is a head-and-shoulders girl facing the viewer, drawn with PIL.ImageDraw at 4x supersampling
and downsampled with LANCZOS. The layout is deliberately FIXED (only small jitter) so that a tiny diffusion
model can learn it and so that :mod:`moas.eval.attributes` can measure hair colour, eye colour and background
from fixed regions without any learned classifier:

* hair always covers a cap on top of the head (image x 0.36-0.64, y 0.19-0.31 is hair for every style);
* two large irises (~14% of the width, ~18% of the height) sit at x 0.39 / 0.61, y 0.545;
* the background is visible in the top corners and in narrow side bands (x < 0.09 or > 0.91).

Some (hair colour, background) pairs are held out of training (:func:`held_out_pairs`) so that
compositional generalisation can be evaluated with :func:`eval_cases`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from moas.data.synthetic_draw import (  # noqa: F401 (the demo vocabulary is part of this module's interface)
    ACCESSORIES,
    ACCESSORY_TAGS,
    ARTISTS,
    BACKGROUND_TAGS,
    BACKGROUNDS,
    EXPRESSIONS,
    EYE_COLORS,
    EYES,
    HAIR_COLORS,
    HAIR_STYLES,
    STYLE_TAGS,
    _check,
    draw_character,
    prompt_for,
)
from moas.data.synthetic_files import DemoWriter, deck, save_pair
from moas.data.synthetic_panels import remove_stale_sequences, write_sequences
from moas.data.synthetic_scene import generate_two_character_dataset
from moas.errors import DataError
from moas.io import atomic_write_bytes

MANIFEST_VERSION = 1
SCENES = ("one", "two")  # one girl per image (this module), or two (synthetic_scene)


def held_out_pairs(seed: int) -> list[tuple[str, str]]:
    """8 (hair_color, background) pairs never shown in training: one per hair colour, all backgrounds."""
    rng = random.Random(f"moas-held-out:{seed}")
    bgs, hairs = list(BACKGROUNDS), list(HAIR_COLORS)
    rng.shuffle(bgs)
    bgs += rng.sample(list(BACKGROUNDS), len(HAIR_COLORS) - len(BACKGROUNDS))
    rng.shuffle(hairs)
    pairs = dict(zip(hairs, bgs, strict=True))
    return [(h, pairs[h]) for h in HAIR_COLORS]


def generate_demo_dataset(
    out_dir: str | os.PathLike,
    n_images: int = 1200,
    size: int = 64,
    seed: int = 0,
    artists: Sequence[str] = ("artist_a", "artist_b"),
    progress: bool = True,
    sequences: int = 0,
    sequence_tag_drop: float = 0.0,
    scene: str = "one",
) -> dict:
    """Write ``out_dir/train/<artist>/<NNNNN>.png|.txt`` and ``out_dir/manifest.json``; return the manifest.

    ``sequences`` > 0 also writes that many panel sequences (``moas.data.synthetic_panels``);
    ``sequence_tag_drop`` is the probability that a later panel's caption omits the hair / eye colour
    (there; 0 = every caption complete). ``scene`` "two" writes two-character scenes instead
    (``moas.data.synthetic_scene``; its manifest says ``"scene": "two"``); "one" is this module's set."""
    out, artists = Path(out_dir), list(artists)
    if out.exists() and not out.is_dir():
        raise DataError(f"Output path {out} exists and is a file, not a directory.")
    if n_images < 1 or size < 16 or not artists:
        raise DataError(f"Need n_images >= 1, size >= 16 and one artist (got {n_images}, {size}, {artists}).")
    for a in artists:
        _check(artist=a)
    if scene not in SCENES:
        raise DataError(f"Unknown scene {scene!r}; expected one of {', '.join(SCENES)}.")
    if scene == "two":
        if sequences:
            raise DataError("Panel sequences show one character; they cannot be combined with scene 'two'.")
        return generate_two_character_dataset(out, n_images, size, seed, artists, progress)
    held = held_out_pairs(seed)
    images = _write_images(out, n_images, size, seed, artists, held, progress)
    seq_entries, seq_files = (
        write_sequences(out, sequences, size, seed, artists, held, sequence_tag_drop)
        if sequences
        else ([], set())
    )
    remove_stale_sequences(out, artists, seq_files)

    vocab = {"hair_color": HAIR_COLORS, "hair_style": HAIR_STYLES, "eye_color": EYE_COLORS}
    vocab |= {"background": BACKGROUNDS, "accessories": ACCESSORIES, "artist": artists}
    manifest = {"version": MANIFEST_VERSION, "seed": seed, "size": size, "n_images": n_images}
    manifest["attributes"] = {k: list(v) for k, v in vocab.items()}
    manifest["held_out"] = [{"hair_color": h, "background": b} for h, b in held]
    manifest["images"] = images
    if seq_entries:
        if sequence_tag_drop > 0:
            manifest["sequence_tag_drop"] = sequence_tag_drop
        manifest["sequences"] = seq_entries
    # Atomic: readers never see a half-written manifest.
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1).encode("utf-8"))
    return manifest


def _write_images(
    out: Path,
    n_images: int,
    size: int,
    seed: int,
    artists: list[str],
    held: list[tuple[str, str]],
    progress: bool,
) -> list[dict]:
    """The ordinary (non-sequence) images with their captions; returns their manifest entries.

    The attribute decks are dealt here, in order; each image is then drawn from its own random stream, so
    a large set is drawn by several processes with the same files as one."""
    plan = random.Random(f"moas-plan:{seed}")
    hair_deck, eye_deck = deck(list(HAIR_COLORS), plan), deck(list(EYE_COLORS), plan)
    style_deck, artist_deck = deck(HAIR_STYLES, plan), deck(artists, plan)
    bg_decks = {h: deck([b for b in BACKGROUNDS if (h, b) not in held], plan) for h in HAIR_COLORS}
    writer = DemoWriter(out, n_images, artists)
    jobs = []
    for i in range(n_images):
        hair = next(hair_deck)
        attrs = {"hair_color": hair, "hair_style": next(style_deck), "eye_color": next(eye_deck)}
        attrs["background"] = next(bg_decks[hair])
        jobs.append((str(out), writer.digits, seed, size, i, attrs, next(artist_deck)))
    workers = min(os.cpu_count() or 1, 4) if n_images >= PARALLEL_FROM else 1
    images = []
    with _pool(workers) as pool:
        drawn = pool.map(_draw_one, jobs, chunksize=16) if pool else map(_draw_one, jobs)
        for entry in writer.progress(drawn, n_images, progress, "demo dataset"):
            writer.mark(entry["file"])
            images.append(entry)
    writer.remove_stale()
    return images


PARALLEL_FROM = 200  # below this, starting worker processes costs more than it saves


def _pool(workers: int):
    """A process pool of ``workers`` (spawned: safe whatever threads the caller runs), or a null context."""
    import contextlib
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if workers < 2:
        return contextlib.nullcontext(None)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _draw_one(job: tuple) -> dict:
    """Draw and write one image with its caption (in a worker process or in this one)."""
    out, digits, seed, size, i, attrs, artist = job
    rng = random.Random(f"moas-img:{seed}:{i}")  # per-image stream: output is independent of n_images
    n_acc = rng.choices((0, 1, 2), (0.35, 0.4, 0.25))[0]
    attrs = dict(attrs, accessories=sorted(rng.sample(ACCESSORIES, n_acc), key=ACCESSORIES.index))
    attrs["expression"] = rng.choice(EXPRESSIONS)
    img = draw_character(attrs, size, artist, rng)
    keys = ("hair_color", "eye_color", "background", "hair_style", "accessories")
    caption = prompt_for(*(attrs[k] for k in keys), rng=rng, expression=attrs["expression"])
    file = save_pair(Path(out), f"train/{artist}/{i:0{digits}d}", img, caption)
    return {"file": file, **attrs, "artist": artist, "caption": caption}


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """Read ``manifest.json`` from ``data_dir`` or its parent (so ``demo`` and ``demo/train`` both work)."""
    base = Path(data_dir)
    for cand in (base / "manifest.json", base.parent / "manifest.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DataError(f"Demo manifest {cand} could not be read ({exc}).") from exc
    raise DataError(f"No manifest.json found in {base} or its parent; generate the demo dataset first.")


def eval_cases(manifest: dict, n_per_split: int, seed: int) -> list[dict]:
    """Evaluation prompts: ``n_per_split`` held-out (hair, background) pairs and as many seen pairs."""
    if manifest.get("scene", "one") != "one":
        raise DataError(
            "This is a two-character demo set; its prompts come from synthetic_scene.binding_eval_cases."
        )
    try:
        held = [(d["hair_color"], d["background"]) for d in manifest["held_out"]]
        seen = sorted({(d["hair_color"], d["background"]) for d in manifest["images"]} - set(held))
    except (KeyError, TypeError) as exc:
        raise DataError(f"The manifest is missing the field {exc} needed for evaluation.") from exc
    if not held or not seen:
        raise DataError("The manifest has no held-out or no seen (hair colour, background) pairs.")
    rng = random.Random(f"moas-eval:{seed}")
    rng.shuffle(held)
    rng.shuffle(seen)
    cases = []
    for split, pairs in (("held_out", held), ("seen", seen)):
        for k in range(n_per_split):  # cycle so that every held-out pair is evaluated
            hair, bg = pairs[k % len(pairs)]
            eye, style = rng.choice(list(EYE_COLORS)), rng.choice(HAIR_STYLES)
            case = {"split": split, "prompt": prompt_for(hair, eye, bg, style), "hair_color": hair}
            case |= {"eye_color": eye, "background": bg, "hair_style": style, "seed": rng.randrange(2**31)}
            cases.append(case)
    return cases
