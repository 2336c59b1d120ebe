"""The NSFW keyword blacklist shared by the downloader (tag filtering) and generation (prompt refusal).

The original system filters Danbooru tag strings with a blacklist of 40+ keywords. Matching is done on
normalised tags (lower case, underscores and hyphens as spaces), and a keyword matches a tag when the
tag equals it or contains it as whole words, so ``nude`` catches ``nude_filter`` style tags and
``completely nude`` but not ``nuder`` or an unrelated word that merely contains the letters.
"""

from __future__ import annotations

import re

NSFW_BLACKLIST: tuple[str, ...] = (
    "nsfw",
    "nude",
    "nudity",
    "naked",
    "topless",
    "bottomless",
    "nipples",
    "nipple",
    "areola",
    "areolae",
    "breasts out",
    "pussy",
    "vagina",
    "penis",
    "testicles",
    "erection",
    "sex",
    "sexual",
    "hentai",
    "porn",
    "pornography",
    "explicit",
    "cum",
    "semen",
    "ejaculation",
    "masturbation",
    "fellatio",
    "cunnilingus",
    "paizuri",
    "handjob",
    "footjob",
    "anal",
    "oral",
    "rape",
    "bdsm",
    "bondage",
    "tentacle sex",
    "lingerie",
    "underwear only",
    "panties",
    "pantyshot",
    "upskirt",
    "cameltoe",
    "ahegao",
    "lewd",
    "ecchi",
    "loli",
    "shota",
    "gore",
    "guro",
    "x-ray",
    "cross-section",
    "bukkake",
    "gangbang",
    "futanari",
)

_SPLIT = re.compile(r"[,\n]+")
_NORMALISE = re.compile(r"[\s_\-]+")


def normalise_tag(tag: str) -> str:
    """``Breasts_Out`` → ``breasts out``: lower case, ``_``/``-``/runs of spaces as one space."""
    return _NORMALISE.sub(" ", tag.strip().lower()).strip()


_PATTERNS = tuple(
    (word, re.compile(r"(?<![a-z0-9])" + re.escape(normalise_tag(word)) + r"(?![a-z0-9])"))
    for word in NSFW_BLACKLIST
)


def blacklisted_terms(text: str) -> list[str]:
    """The blacklist keywords found in a prompt or tag string (comma- or space-separated tags)."""
    tags = [normalise_tag(t) for t in _SPLIT.split(text)]
    found: list[str] = []
    for word, pattern in _PATTERNS:
        if any(pattern.search(t) for t in tags if t):
            found.append(word)
    return found


def is_nsfw(text: str) -> bool:
    """True when the prompt or tag string contains any blacklisted keyword."""
    return bool(blacklisted_terms(text))
