"""The file side of the demo drawers: per-artist folders, balanced decks, image + caption pairs, stale files.

Both :mod:`moas.data.synthetic` (one character) and :mod:`moas.data.synthetic_scene` (two characters)
write ``out/train/<artist>/<NNNNN>.png|.txt``; this is the one place that knows that layout.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image


def deck(values: Sequence[Any], rng: random.Random) -> Iterator[Any]:
    """Shuffled cycles: every value appears equally often, uncorrelated with other decks."""
    while True:
        vals = list(values)
        rng.shuffle(vals)
        yield from vals


class DemoWriter:
    """Writes the numbered image + caption pairs of one drawer run and removes what an older run left."""

    def __init__(self, out: Path, n_images: int, artists: Sequence[str]) -> None:
        self.out, self.artists = out, list(artists)
        self.digits = max(5, len(str(n_images - 1)))
        self.written: set[Path] = set()
        for a in self.artists:
            (out / "train" / a).mkdir(parents=True, exist_ok=True)

    def indices(self, n_images: int, progress: bool, desc: str) -> Iterable[int]:
        """``range(n_images)``, under a progress bar when asked."""
        if not progress:
            return range(n_images)
        from tqdm import tqdm

        return tqdm(range(n_images), desc=desc, unit="img")

    def save(self, index: int, artist: str, image: Image.Image, caption: str) -> str:
        """Write the pair; return its relative path with ``.png``."""
        rel = f"train/{artist}/{index:0{self.digits}d}"
        image.save(self.out / f"{rel}.png", format="PNG")
        (self.out / f"{rel}.txt").write_text(caption + "\n", encoding="utf-8")
        self.written |= {self.out / f"{rel}.png", self.out / f"{rel}.txt"}
        return f"{rel}.png"

    def remove_stale(self) -> None:
        """Regenerating into an old folder (of either drawer) must not leave images of a larger run."""
        for a in self.artists:
            for p in (self.out / "train" / a).iterdir():
                if re.fullmatch(r"\d{5,}\.(png|txt)", p.name) and p not in self.written:
                    p.unlink()
