"""The tag-category prior of per-tag routing: a small keyword table that names the expert a tag belongs to.

A caption's tags (``moas.text.encoder.split_tags``) are looked up word by word: the first category in
``CATEGORY_ORDER`` with a keyword among the tag's words (a keyword of several words must appear in order)
wins, so ``"white background"`` is ``scene`` (scenes are checked before colours), ``"light blue hair"`` is
``color`` (colours before light) and ``"red hair"`` is ``color``; ``"by <name>"`` and ``"artist:<name>"``
are ``style``. A tag with no keyword is ``other``. Categories are the experts' own names, so a category index
is the index of its expert in ``EXPERT_NAMES``; ``other`` (and padding) is ``len(EXPERT_NAMES)``.

The router adds ``tag_prior`` to the logit of a tag's category expert (``prior_logits``). The bias is fixed;
the router learns over it, so a tag stays with its category's expert only while that helps the loss.
The table is a starting point, not a tagger: Danbooru artist tags are bare names and only reach ``style``
when written as ``by …``, ``artist:…`` or ``… style``.
"""

from __future__ import annotations

import functools
import re

import torch

from moas.models.moe import EXPERT_NAMES
from moas.text.encoder import split_tags

OTHER = "other"
OTHER_INDEX = len(EXPERT_NAMES)  # the category index of uncategorised tags and of padding
CATEGORIES = (*EXPERT_NAMES, OTHER)  # index → name; the experts' order, then "other"

# Category → keywords (lower case; several words = a phrase). Checked in CATEGORY_ORDER.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "quality": (
        "masterpiece",
        "best quality",
        "high quality",
        "low quality",
        "worst quality",
        "normal quality",
        "quality",
        "absurdres",
        "highres",
        "lowres",
        "jpeg artifacts",
        "blurry",
    ),
    "style": ("artist", "style", "anime coloring", "watercolor", "painting", "cel shading", "chibi"),
    "safety": ("nsfw", "sfw", "safe", "rating", "censored", "uncensored", "nude", "gore"),
    "editing": ("inpainting", "edited", "edit", "retouched", "recolor", "cropped", "outpainting"),
    "memory": ("same character", "consistent", "continuity", "previous panel", "recurring"),
    "line_art": ("lineart", "line art", "sketch", "monochrome", "greyscale", "grayscale", "outline", "ink"),
    "camera": (
        "from above",
        "from below",
        "from side",
        "from behind",
        "view",
        "angle",
        "close-up",
        "closeup",
        "portrait",
        "upper body",
        "full body",
        "cowboy shot",
        "looking at viewer",
        "pov",
        "wide shot",
        "fisheye",
        "dutch angle",
    ),
    "scene": (
        "background",
        "scenery",
        "outdoors",
        "indoors",
        "forest",
        "beach",
        "city",
        "street",
        "sky",
        "night",
        "day",
        "room",
        "classroom",
        "ocean",
        "sea",
        "mountain",
        "field",
        "garden",
        "sakura",
        "cherry blossoms",
        "snow",
        "rain",
        "water",
        "tree",
        "building",
        "landscape",
    ),
    "color": (
        "red",
        "orange",
        "yellow",
        "green",
        "blue",
        "aqua",
        "purple",
        "violet",
        "pink",
        "brown",
        "black",
        "white",
        "grey",
        "gray",
        "silver",
        "blonde",
        "gold",
        "colorful",
        "pastel",
        "multicolored",
        "two-tone",
        "gradient",
    ),
    "light": (
        "lighting",
        "light",
        "sunlight",
        "moonlight",
        "backlighting",
        "shadow",
        "glowing",
        "glow",
        "sunset",
        "sunrise",
        "bright",
        "lens flare",
        "silhouette",
    ),
    "anatomy": (
        "standing",
        "sitting",
        "lying",
        "kneeling",
        "walking",
        "running",
        "jumping",
        "pose",
        "arms",
        "arm",
        "hand",
        "hands",
        "legs",
        "leg",
        "body",
        "hair",
        "eyes",
        "face",
        "tall",
        "muscular",
        "breasts",
        "fingers",
    ),
    "structure": ("1girl", "1boy", "2girls", "2boys", "3girls", "solo", "multiple", "group", "duo", "couple"),
    "story": ("smile", "crying", "angry", "sad", "happy", "blush", "laughing", "comic", "4koma", "speech"),
    "precision": ("detailed", "intricate", "sharp focus", "sharp", "fine details", "realistic"),
}
CATEGORY_ORDER = tuple(KEYWORDS)  # the priority order of the lookup
_SPLIT = re.compile(r"[\s_]+")


def _words(tag: str) -> list[str]:
    return [w for w in _SPLIT.split(tag.lower().strip()) if w]


def _has_phrase(words: list[str], phrase: tuple[str, ...]) -> bool:
    n = len(phrase)
    return any(tuple(words[i : i + n]) == phrase for i in range(len(words) - n + 1))


_PHRASES = {cat: tuple(tuple(_words(k)) for k in keys) for cat, keys in KEYWORDS.items()}


# A pure function of the tag's text, asked for every tag of every caption at every step (the phrase search
# is ~10 ms of Python per training batch): the answers are kept. The bound covers a large folder's
# vocabulary; tags beyond it are recomputed, never wrong.
@functools.lru_cache(maxsize=1 << 16)
def tag_category(tag: str) -> str:
    """The category of one tag (an expert's name, or ``other``)."""
    words = _words(tag)
    if (len(words) > 1 and words[0] == "by") or (bool(words) and words[0].startswith("artist:")):
        return "style"  # an artist's name itself is in no table
    for cat in CATEGORY_ORDER:
        if any(_has_phrase(words, p) for p in _PHRASES[cat]):
            return cat
    return OTHER


_CATEGORY_INDEX = {name: i for i, name in enumerate(CATEGORIES)}


def caption_categories(caption: str) -> list[int]:
    """Category index of each tag of ``caption``, in ``split_tags`` order."""
    return [_CATEGORY_INDEX[tag_category(t)] for t in split_tags(caption)]


def tag_category_batch(captions: list[str], width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``tag_category`` [B, width] (long) aligned with the text encoding's ``tags``; padding is ``other``."""
    out = torch.full((len(captions), width), OTHER_INDEX, dtype=torch.long)
    for b, caption in enumerate(captions):
        cats = caption_categories(caption)[:width]
        if cats:
            out[b, : len(cats)] = torch.tensor(cats)
    return out.to(device)
