"""Expert tokens: each expert's state, and the GNN's graph features, as its own cross-attention token.

The context bridge (``moas.models.bridge.ContextBridge``) gives the U-Net one token for all 14 expert
states (their mean). With ``brain.expert_tokens`` this stage adds one token per expert and one for the GNN
output, so a U-Net position can attend to the expert it needs:

    token_i = W · LayerNorm(state_i) + b + embed_i        (i = the 14 experts, then the GNN)

``W`` is shared (the states live in one width) and ``embed_i`` is a learned per-expert embedding that tells
the tokens apart. ``W``, ``b`` and the embeddings start at zero — an untrained stage adds exactly-zero
tokens, never noise (the bridge's rule) — and are built without drawing from the random stream, so the
rest of the model's initial weights do not depend on this switch.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertTokens(nn.Module):
    """expert_states [B,E,D] + graph_features [B,D] → extra_context [B,E+1,out_dim] (+ its mask)."""

    def __init__(self, num_experts: int, dim: int, out_dim: int = 768) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.utils.skip_init(nn.Linear, dim, out_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.embed = nn.Parameter(torch.zeros(num_experts + 1, out_dim))

    def forward(self, expert_states: torch.Tensor, graph_features: torch.Tensor) -> dict[str, torch.Tensor]:
        nodes = torch.cat([expert_states, graph_features.unsqueeze(1)], 1)  # (B, E+1, D)
        tokens = self.proj(self.norm(nodes)) + self.embed.to(nodes.dtype)  # (B, E+1, out_dim)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return {"extra_context": tokens, "extra_context_mask": mask}
