"""The structure and art experts wired after the GNN, and the multi-language story system.

The original names these modules and their wiring but not their layers, so each is a small residual MLP
in the expert width (512): ``gnn.graph_features → structure.embedding``, ``structure → line_art``,
``structure → background``, ``structure → camera``; the colour expert conditions on the emotion scores
(mood palettes); the story expert on the prompt's detected language. Every output is projected to a
cross-attention token by the bridge, so the diffusion loss trains all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from moas.text.language import LANGUAGES


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
