"""Captions: ``.txt`` / ``.caption`` files paired by stem, and the per-epoch caption augmentations.

Augmentations follow the conventions of kohya sd-scripts and EveryDream2: tag shuffling that keeps the
first ``keep_tokens`` tags in place (e.g. the character name), tag dropout, and whole-caption dropout.
They are a pure function of (caption, seed, epoch, index), so a resumed run sees the same captions.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CAPTION_SUFFIXES = (".txt", ".caption")
_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def read_caption(image_path: Path) -> str:
    """The caption paired by file stem (``image.png`` → ``image.txt``, else ``image.caption``), or "".

    Non-UTF-8 files are decoded as Latin-1 and empty files give ""; each case warns once per file.
    """
    for suffix in CAPTION_SUFFIXES:
        p = image_path.with_suffix(suffix)
        if p.is_file():
            raw = p.read_bytes()
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                _warn_once(str(p), "%s is not UTF-8; decoding it as Latin-1.", p.name)
                text = raw.decode("latin-1")
            text = " ".join(text.split())
            if not text:
                _warn_once(str(p), "Caption file %s is empty; the image trains with the null prompt.", p.name)
            return text
    return ""


def warn_coverage(captioned: int, total: int, root: Path) -> None:
    """Uncaptioned images train on the null prompt: fine for a few, a quiet disaster for most."""
    if captioned * 2 < total:
        log.warning(
            "Only %d of %d images in %s have a caption; the other %d train on the empty prompt, so prompts "
            "will steer the model little. Add .txt tag files, or write them with 'moas caption --data_dir "
            "%s' (it learns tags from the captioned images).",
            captioned,
            total,
            root,
            total - captioned,
            root,
        )


@dataclass(frozen=True)
class CaptionAugment:
    """Per-epoch caption changes (all off by default)."""

    keep_tokens: int = 0  # leading tags that never move or drop out
    shuffle_tags: bool = False  # shuffle the remaining comma-separated tags
    tag_dropout: float = 0.0  # probability of dropping each remaining tag
    caption_dropout: float = 0.0  # probability of replacing the whole caption with ""

    @property
    def active(self) -> bool:
        return self.shuffle_tags or self.tag_dropout > 0 or self.caption_dropout > 0

    def __call__(self, caption: str, seed: int, epoch: int, index: int) -> str:
        if not self.active or not caption:
            return caption
        digest = hashlib.sha256(f"{seed}|{epoch}|{index}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        if self.caption_dropout > 0 and rng.random() < self.caption_dropout:
            return ""
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head, tail = tags[: self.keep_tokens], tags[self.keep_tokens :]
        if self.tag_dropout > 0:
            tail = [t for t in tail if rng.random() >= self.tag_dropout]
        if self.shuffle_tags:
            rng.shuffle(tail)
        return ", ".join(head + tail)
