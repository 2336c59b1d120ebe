"""Demo panel sequences for ``moas make-data --sequences K`` (off by default).

Each sequence is 3–4 panels of one character — same hair colour and style, eyes, accessories, clothes,
skin and background (every panel is drawn from the same per-sequence random stream) — that differ in
expression and in framing: each panel is a crop of the drawn portrait at its own offset and zoom (the
camera moves, so the character's position and scale change) resized back to the full size. Files are
``train/<artist>/seq<NNN>_p<k>.png`` + ``.txt``, the panel naming that ``ArtDataset`` reads as a sequence.

The sequences use their own random streams, so the demo's ordinary images (and the manifest's
``images`` list that the held-out evaluation reads) are identical with or without them; the sequences
also avoid the held-out (hair colour, background) pairs. They are listed in the manifest under
``sequences``.

``tag_drop`` p > 0 (``moas make-data --sequence_tag_drop p``) makes later panels' captions brief, like
later comic panels whose descriptions no longer repeat the character's looks: in panels 2.. each of the
"<colour> hair" and "<colour> eyes" tags is dropped with probability p (independently; panel 1 always
keeps the full caption). Only then can the panel memory add something the prompt does not already say:
with full captions the text alone fixes the colours. The drops use their own random stream and the
caption is built exactly as before and then thinned, so p = 0 writes byte-identical files (and the same
manifest); with p > 0 each panel's manifest entry records the colour tags it kept under ``kept_tags``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from moas.data.synthetic_draw import (
    ACCESSORIES,
    BACKGROUNDS,
    EXPRESSIONS,
    EYE_COLORS,
    HAIR_COLORS,
    HAIR_STYLES,
    draw_character,
    prompt_for,
)
from moas.errors import DataError

SEQUENCE_FILE = re.compile(r"seq\d{3,}_p\d+\.(png|txt)")


def reframe(img: Image.Image, zoom: float, dx: float, dy: float) -> Image.Image:
    """Crop a window of side size/zoom offset by (dx, dy) (fractions of the free margin) and resize back."""
    size = img.size[0]
    side = size / zoom
    margin = size - side
    left, top = margin * (0.5 + 0.5 * dx), margin * (0.5 + 0.5 * dy)
    return img.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


def colour_tag(attribute: str, value: str) -> str:
    """The caption tag of a hair or eye colour: ``colour_tag("hair_color", "red")`` = "red hair"."""
    return f"{value} {'hair' if attribute == 'hair_color' else 'eyes'}"


def drop_tags(caption: str, tags: Sequence[str]) -> str:
    """``caption`` ("1girl, a, b, ...") without the given tags; the others keep their order."""
    parts = caption.split(", ")
    missing = [t for t in tags if t not in parts]
    if missing:
        raise DataError(f"Tags {missing} are not in the caption {caption!r}.")
    return ", ".join(t for t in parts if t not in tags)


def write_sequences(
    out: Path,
    n_sequences: int,
    size: int,
    seed: int,
    artists: Sequence[str],
    held: Sequence[tuple[str, str]],
    tag_drop: float = 0.0,
) -> tuple[list[dict], set[Path]]:
    """Write the sequences; returns their manifest entries and the files written.

    ``tag_drop``: probability that a panel after the first loses its hair / eye colour tag (module
    docstring)."""
    if not 0.0 <= tag_drop <= 1.0:
        raise DataError(f"The sequence tag drop probability must be in [0, 1], got {tag_drop}.")
    entries, written = [], set()
    digits = max(3, len(str(n_sequences - 1)))
    for s in range(n_sequences):
        plan = random.Random(f"moas-seq:{seed}:{s}")
        hair = plan.choice(list(HAIR_COLORS))
        bg = plan.choice([b for b in BACKGROUNDS if (hair, b) not in held])
        attrs = {
            "hair_color": hair,
            "hair_style": plan.choice(HAIR_STYLES),
            "eye_color": plan.choice(list(EYE_COLORS)),
        }
        attrs |= {"background": bg, "accessories": sorted(plan.sample(ACCESSORIES, plan.choice((0, 1))))}
        artist = artists[s % len(artists)]
        n_panels = plan.choice((3, 4))
        draw_seed = plan.randrange(2**31)
        # A separate stream, so that dropping tags changes nothing else about the sequence.
        drop_rng = random.Random(f"moas-seq-drop:{seed}:{s}")
        panels = []
        for k in range(n_panels):
            expression = plan.choice(EXPRESSIONS)
            # The same drawing stream every panel: identical background, skin, clothes and jitter.
            img = draw_character({**attrs, "expression": expression}, size, artist, random.Random(draw_seed))
            zoom, dx, dy = plan.uniform(1.0, 1.3), plan.uniform(-1, 1), plan.uniform(-1, 1)
            img = reframe(img, zoom, dx, dy)
            keys = ("hair_color", "eye_color", "background", "hair_style", "accessories")
            caption = prompt_for(*(attrs[k] for k in keys), rng=plan, expression=expression)
            kept = {"hair_color": True, "eye_color": True}
            if tag_drop > 0 and k > 0:
                kept = {name: drop_rng.random() >= tag_drop for name in kept}
                caption = drop_tags(
                    caption, [colour_tag(n, attrs[n]) for n, keep in kept.items() if not keep]
                )
            rel = f"train/{artist}/seq{s:0{digits}d}_p{k + 1}"
            img.save(out / f"{rel}.png", format="PNG")
            (out / f"{rel}.txt").write_text(caption + "\n", encoding="utf-8")
            written |= {out / f"{rel}.png", out / f"{rel}.txt"}
            panel = {
                "file": f"{rel}.png",
                "expression": expression,
                "caption": caption,
                "zoom": round(zoom, 3),
            }
            if tag_drop > 0:  # absent at p = 0: the manifest stays byte-identical to earlier versions
                panel["kept_tags"] = kept
            panels.append(panel)
        entries.append({**attrs, "artist": artist, "panels": panels})
    return entries, written


def remove_stale_sequences(out: Path, artists: Sequence[str], written: set[Path]) -> None:
    """Delete sequence files of an earlier, larger run that this run did not write."""
    for a in artists:
        folder = out / "train" / a
        if folder.is_dir():
            for p in folder.iterdir():
                if SEQUENCE_FILE.fullmatch(p.name) and p not in written:
                    p.unlink()
