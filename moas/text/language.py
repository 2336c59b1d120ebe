"""Language detection for prompts: the story expert's input (one of 10 languages).

By script first (kana → Japanese, hangul → Korean, CJK ideographs → Chinese, Cyrillic, Thai), then by
function words for the Latin-script languages; English otherwise.
"""

from __future__ import annotations

import functools
import re

import torch

LANGUAGES = ("en", "ja", "zh", "ko", "ru", "th", "es", "fr", "de", "pt")

# Function words that identify the Latin-script languages (lower case, whole words).
_STOPWORDS = {
    "es": {
        "el",
        "la",
        "los",
        "las",
        "un",
        "una",
        "y",
        "con",
        "en",
        "del",
        "de",
        "niña",
        "bosque",
        "pelo",
        "ojos",
    },
    "fr": {
        "le",
        "la",
        "les",
        "un",
        "une",
        "et",
        "avec",
        "dans",
        "du",
        "des",
        "fille",
        "forêt",
        "cheveux",
        "yeux",
    },
    "de": {
        "der",
        "die",
        "das",
        "ein",
        "eine",
        "und",
        "mit",
        "im",
        "auf",
        "mädchen",
        "wald",
        "haare",
        "augen",
    },
    "pt": {
        "o",
        "a",
        "os",
        "as",
        "um",
        "uma",
        "e",
        "com",
        "no",
        "na",
        "do",
        "da",
        "menina",
        "floresta",
        "cabelo",
    },
}
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


@functools.lru_cache(maxsize=1 << 14)  # asked for every caption of every training batch
def detect_language(text: str) -> int:
    """Index into ``LANGUAGES`` of the prompt's language: by script, then by function words; English otherwise."""
    counts = {"ja": 0, "zh": 0, "ko": 0, "ru": 0, "th": 0}
    for ch in text:
        o = ord(ch)
        if 0x3040 <= o <= 0x30FF:  # hiragana / katakana
            counts["ja"] += 1
        elif 0x4E00 <= o <= 0x9FFF:  # CJK ideographs (shared by ja and zh)
            counts["zh"] += 1
        elif 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF:
            counts["ko"] += 1
        elif 0x0400 <= o <= 0x04FF:
            counts["ru"] += 1
        elif 0x0E00 <= o <= 0x0E7F:
            counts["th"] += 1
    if counts["ja"]:  # kana marks Japanese even when kanji outnumber it
        return LANGUAGES.index("ja")
    script = max(counts, key=counts.get)
    if counts[script]:
        return LANGUAGES.index(script)
    words = [w.lower() for w in _WORD.findall(text)]
    scores = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
    best = max(scores, key=scores.get)
    return LANGUAGES.index(best) if scores[best] >= 2 else LANGUAGES.index("en")


def language_batch(texts: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """``{"language": LongTensor [B]}`` to merge into a text batch."""
    return {"language": torch.tensor([detect_language(t) for t in texts], dtype=torch.long, device=device)}
