"""The structure and art experts wired after the GNN, and the multi-language story system.

The original names these modules and their wiring but not their layers, so each is a small residual MLP
in the expert width (512): ``gnn.graph_features → structure.embedding``, ``structure → line_art``,
``structure → background``, ``structure → camera``; the colour expert conditions on the emotion scores
(mood palettes); the story expert on the prompt's detected language. Every output is projected to a
cross-attention token by the bridge, so the diffusion loss trains all of them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

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


class _Expert(nn.Module):
    """LayerNorm(cat(inputs)) → Linear(→2D) → GELU → Dropout → Linear(→D) → LayerNorm."""

    def __init__(self, in_dim: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, 2 * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * dim, dim),
            nn.LayerNorm(dim),
        )

    def run(self, *parts: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(parts, -1))  # (B, D)


class StructureGenerator(_Expert):
    """Compositional structure from the graph features: embedding [B,D] → structure [B,D]."""

    def __init__(self, dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__(dim, dim, dropout)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.run(embedding)


class AdvancedLineArtExpert(_Expert):
    """Line art from the bridged embedding and the structure."""

    def __init__(self, dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__(2 * dim, dim, dropout)

    def forward(self, embedding: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
        return self.run(embedding, structure)


class BackgroundExpert(_Expert):
    """Background/scene layout from the bridged embedding and the structure."""

    def __init__(self, dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__(2 * dim, dim, dropout)

    def forward(self, embedding: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
        return self.run(embedding, structure)


class AdvancedCameraExpert(_Expert):
    """Camera angle / perspective from the bridged embedding and the structure."""

    def __init__(self, dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__(2 * dim, dim, dropout)

    def forward(self, embedding: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
        return self.run(embedding, structure)


class AdvancedColorExpert(_Expert):
    """Palette from the bridged embedding and the 10 emotion scores (mood colours)."""

    def __init__(self, dim: int = 512, num_emotions: int = 10, dropout: float = 0.1) -> None:
        super().__init__(dim + num_emotions, dim, dropout)

    def forward(self, embedding: torch.Tensor, emotion_scores: torch.Tensor) -> torch.Tensor:
        return self.run(embedding, emotion_scores.to(embedding.dtype))


class MultiLanguageStorySystem(nn.Module):
    """Narrative conditioning: pooled text [B,768] + detected language [B] (index into LANGUAGES) → story [B,D]."""

    def __init__(self, in_dim: int = 768, dim: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.language_embedding = nn.Embedding(len(LANGUAGES), in_dim)
        nn.init.normal_(self.language_embedding.weight, std=0.02)
        self.narrative = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, 2 * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * dim, dim),
            nn.LayerNorm(dim),
        )

    def forward(self, pooled: torch.Tensor, language: torch.Tensor) -> torch.Tensor:
        return self.narrative(pooled + self.language_embedding(language.to(pooled.device)))  # (B, D)
