"""EmotionalArtisticUnderstanding and DeepUnderstandingSystem, with the original's layer sizes.

Both read the 768-d text representation. ``hidden`` (the original's 1536) and the transformer's depth and
feed-forward width are parameters so small profiles can shrink them; the defaults are the original's.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

EMOTIONS = (
    "joy",
    "sadness",
    "anger",
    "fear",
    "surprise",
    "disgust",
    "neutral",
    "love",
    "nostalgia",
    "melancholy",
)
ARTISTIC_ELEMENTS = ("composition", "color_harmony", "lighting_mood", "perspective_emotion", "line_quality")


def _mlp(i: int, h: int, o: int, dropout: float, norm_out: bool = False) -> nn.Sequential:
    """Linear(i→h) → LayerNorm → GELU → Dropout → Linear(h→o) [→ LayerNorm]."""
    layers: list[nn.Module] = [
        nn.Linear(i, h),
        nn.LayerNorm(h),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(h, o),
    ]
    if norm_out:
        layers.append(nn.LayerNorm(o))
    return nn.Sequential(*layers)


class EmotionalArtisticUnderstanding(nn.Module):
    """pooled [B,768] → emotion_embedding [B,768], emotion_scores [B,10] (softmax), artistic [B,768]."""

    def __init__(self, dim: int = 768, hidden: int = 1536, dropout: float = 0.1) -> None:
        super().__init__()
        n = len(EMOTIONS)
        self.emotion_encoder = _mlp(dim, hidden, dim, dropout, norm_out=True)
        self.emotion_classifier = nn.Sequential(
            nn.Linear(dim, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, n), nn.Softmax(-1)
        )
        self.element_extractors = nn.ModuleDict(
            {k: nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, 128)) for k in ARTISTIC_ELEMENTS}
        )
        self.artistic_style_encoder = _mlp(dim, hidden, dim, dropout)
        self.artistic_fusion = _mlp(dim + 128 * len(ARTISTIC_ELEMENTS), hidden, dim, dropout)
        self.emotion_to_visual = nn.Sequential(
            nn.Linear(dim + n, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
        self.score_history: deque[torch.Tensor] = deque(maxlen=1000)  # batch-mean emotion scores per call

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        emotion = self.emotion_encoder(pooled)  # (B, 768)
        scores = self.emotion_classifier(emotion)  # (B, 10), rows sum to 1
        elements = [f(pooled) for f in self.element_extractors.values()]  # 5 × (B, 128)
        style = self.artistic_style_encoder(pooled)  # (B, 768)
        artistic = self.artistic_fusion(torch.cat([style, *elements], -1))  # (B, 768)
        # The emotion scores are concatenated to the embedding and mapped into the visual representation.
        visual = self.emotion_to_visual(torch.cat([emotion, scores], -1))  # (B, 768)
        # Kept on the device: a .cpu() here would wait for the GPU on every forward; readers move them.
        self.score_history.append(scores.detach().float().mean(0))
        return {"emotion_embedding": visual, "emotion_scores": scores, "artistic": artistic}


class DeepUnderstandingSystem(nn.Module):
    """pooled [B,768] + context tokens [B,T,768] (+ mask) → understanding [B,768].

    ``token_dim`` is the TransformerEncoder's width. The original runs it at the text width (768, the
    default). A smaller value projects the tokens down first and reads the result back through the final
    attention's key/value projections; the 768-wide pooled path is unchanged. At ``cpu_tiny`` size the
    768-wide encoder cost about half of the brain's FLOPs (README "Departures from the original").
    """

    def __init__(
        self,
        dim: int = 768,
        hidden: int = 1536,
        layers: int = 6,
        heads: int = 12,
        ff: int = 3072,
        levels: int = 4,
        dropout: float = 0.1,
        token_dim: int | None = None,
    ) -> None:
        super().__init__()
        e = token_dim or dim
        self.semantic_understanding = _mlp(dim, hidden, dim, dropout)
        self.token_proj = nn.Linear(dim, e) if e != dim else nn.Identity()
        enc_layer = nn.TransformerEncoderLayer(e, heads, ff, dropout=dropout, batch_first=True)
        # enable_nested_tensor=False: the fast path would drop masked positions in eval only.
        self.contextual_encoder = nn.TransformerEncoder(enc_layer, layers, enable_nested_tensor=False)
        self.contextual_proj = nn.Linear(e, dim) if e != dim else nn.Identity()
        self.hierarchical_layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU()) for _ in range(levels)
        )
        self.relationship_net = nn.Sequential(
            nn.Linear(2 * dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
        self.understanding_fusion = _mlp(3 * dim, hidden, dim, dropout)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True, kdim=e, vdim=e)

    def forward(
        self, pooled: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        semantic = self.semantic_understanding(pooled)  # (B, 768)
        tokens = self.token_proj(context)  # (B, T, E)
        encoded = self.contextual_encoder(tokens, src_key_padding_mask=~context_mask)  # (B, T, E)
        m = context_mask.to(encoded.dtype).unsqueeze(-1)
        contextual = self.contextual_proj((encoded * m).sum(1) / m.sum(1).clamp_min(1.0))  # masked mean
        h = semantic
        for level in self.hierarchical_layers:  # 4 levels of increasing abstraction
            h = level(h)
        relation = self.relationship_net(torch.cat([semantic, contextual], -1))  # (B, 768)
        fused = self.understanding_fusion(torch.cat([semantic, contextual, h], -1))  # (B, 768)
        attended = self.attention(
            fused.unsqueeze(1), encoded, encoded, key_padding_mask=~context_mask, need_weights=False
        )[0]
        return {"understanding": fused + attended.squeeze(1) + relation}
