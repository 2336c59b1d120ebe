"""Captions: ``.txt`` / ``.caption`` files paired by stem, and the per-epoch caption augmentations.

Augmentations follow the conventions of kohya sd-scripts and EveryDream2: tag shuffling that keeps the
first ``keep_tokens`` tags in place (e.g. the character name), tag dropout, and whole-caption dropout.
They are a pure function of (caption, seed, epoch, index), so a resumed run sees the same captions.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CAPTION_SUFFIXES = (".txt", ".caption")
_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def has_caption_file(image_path: Path) -> bool:
    return any(image_path.with_suffix(suffix).is_file() for suffix in CAPTION_SUFFIXES)


def read_caption(image_path: Path, names_root: Path | None = None) -> str:
    """The caption paired by file stem (``image.png`` → ``image.txt``, else ``image.caption``), or "".
    With ``names_root``, an image with no caption file is captioned from its folder and file names below
    that folder (``caption_from_names``).

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
            text = booru_to_tags(" ".join(text.split()))
            if not text:
                _warn_once(str(p), "Caption file %s is empty; the image trains with the null prompt.", p.name)
            return text
    return caption_from_names(image_path, names_root) if names_root is not None else ""


# Name parts that say nothing about the picture: cameras, phones, scanners, "Untitled", copies.
NAME_STOPWORDS = frozenset(
    "img image images dsc dscn dscf pxl photo pic picture scan screenshot screen shot untitled copy "
    "final new edit export file unknown misc other transparent png jpg jpeg webp".split()
)


def _name_words(part: str) -> str:
    """A folder or file name as words: separators to spaces, numbers, hashes and stop words dropped."""
    words = re.split(r"[\s_\-.+()\[\]]+", part)
    keep = [
        w
        for w in words
        if w
        and not w.isdigit()
        and not re.fullmatch(r"[0-9a-f]{8,}", w.lower())  # content hashes, booru md5 names
        and w.lower() not in NAME_STOPWORDS
        and not re.fullmatch(r"\d+(px|x\d+)?", w.lower())  # sizes such as 512px, 1920x1080
    ]
    return " ".join(keep).lower()


def caption_from_names(image_path: Path, root: Path) -> str:
    """Tags from the folders below ``root`` and the file name: ``root/elves/elvish_archer-2.png`` gives
    ``elves, elvish archer``. Folders of a collection usually name its characters, series or kinds; names
    made of numbers, hashes and camera prefixes give nothing."""
    try:
        parts = [*image_path.relative_to(root).parent.parts, image_path.stem]
    except ValueError:  # not below root
        parts = [image_path.stem]
    tags: list[str] = []
    for part in parts:
        words = _name_words(part)
        if words and words not in tags:
            tags.append(words)
    return ", ".join(tags)


def booru_to_tags(text: str) -> str:
    """A booru-style tag file as the comma-separated tags moas trains on: ``1girl long_hair blue_eyes`` (tags
    separated by spaces, words by underscores, as booru sites and their downloaders write them) becomes
    ``1girl, long hair, blue eyes``; underscores inside comma-separated tags become spaces too, as people
    type them in prompts. Short emoticon tags (``^_^``, ``o_o``) keep theirs. Other captions are unchanged."""
    if "_" not in text:
        return text
    if "," in text:
        tags = [t.strip() for t in text.split(",")]
    else:  # space-separated tags: a caption without commas is one only when it has underscored tags
        tags = text.split()
    return ", ".join(t if len(t) <= 3 else " ".join(t.replace("_", " ").split()) for t in tags if t)


def count_named(paths: list[Path], captions: list[str]) -> int:
    """How many of the images were captioned from their names (no caption file, a caption)."""
    return sum(1 for p, c in zip(paths, captions, strict=True) if c and not has_caption_file(p))


def warn_coverage(captioned: int, total: int, root: Path, named: int = 0) -> None:
    """Uncaptioned images train on the null prompt: fine for a few, a quiet disaster for most. ``named`` of
    the captions came from folder and file names (said, so a user knows where they came from)."""
    if named:
        log.info("%d of %d images in %s are captioned from their folder and file names.", named, total, root)
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
