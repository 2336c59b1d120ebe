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
        return self.progress(range(n_images), n_images, progress, desc)

    @staticmethod
    def progress(items: Iterable, total: int, progress: bool, desc: str) -> Iterable:
        """``items``, under a progress bar when asked."""
        if not progress:
            return items
        from tqdm import tqdm

        return tqdm(items, total=total, desc=desc, unit="img")

    def save(self, index: int, artist: str, image: Image.Image, caption: str) -> str:
        """Write the pair; return its relative path with ``.png``."""
        file = save_pair(self.out, f"train/{artist}/{index:0{self.digits}d}", image, caption)
        self.mark(file)
        return file

    def mark(self, file: str) -> None:
        """Record a pair written (by this process or a worker) under its ``.png`` path, so it is kept."""
        png = self.out / file
        self.written |= {png, png.with_suffix(".txt")}

    def remove_stale(self) -> None:
        """Regenerating into an old folder (of either drawer) must not leave images of a larger run."""
        for a in self.artists:
            for p in (self.out / "train" / a).iterdir():
                if re.fullmatch(r"\d{5,}\.(png|txt)", p.name) and p not in self.written:
                    p.unlink()


def save_pair(out: Path, rel: str, image: Image.Image, caption: str) -> str:
    """Write ``out/rel.png`` and its caption ``out/rel.txt``; return ``rel.png``."""
    image.save(out / f"{rel}.png", format="PNG")
    (out / f"{rel}.txt").write_text(caption + "\n", encoding="utf-8")
    return f"{rel}.png"
