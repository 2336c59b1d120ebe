"""Per-tag routing: each caption tag is routed over the experts, and each expert reads the tags routed to it.

With ``brain.tag_routing`` the MoE's router scores every tag embedding ``t_g`` (LayerNorm'd, as the text
context normalises tags) instead of the one pooled sentence vector:

    w[g] = softmax(router(t_g) / temperature + prior[g] + balance_bias)       (per tag, over the E experts)
    x_e  = Σ_g w[g,e] t_g / Σ_g w[g,e]                                         (expert e's input)

so an expert's input is the routing-weighted mean of the tags routed to it rather than the shared sentence
(padding tags get no weight). The prompt-level routing that weights the expert states in the MoE output is
the mean of the real tags' rows, and the load-balance loss ``E · Σ p̄² − 1`` is taken over all real tags of
the batch (p̄ = their mean row): zero when the tags spread evenly over the experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalise_tags(tags: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm of the tag embeddings [B,G,C] (the text context's normalisation)."""
    return F.layer_norm(tags, tags.shape[-1:])


def tag_weights(logits: torch.Tensor, tag_mask: torch.Tensor) -> torch.Tensor:
    """Router logits [B,G,E] → per-tag routing weights [B,G,E]; rows of real tags sum to 1, padding is 0."""
    return logits.float().softmax(-1) * tag_mask.unsqueeze(-1).float()


def routed_inputs(tags: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each expert's input [B,E,C]: the mean of the tags [B,G,C] weighted by their routing weights [B,G,E]."""
    w = weights.to(tags.dtype)
    total = w.sum(1).clamp_min(torch.finfo(tags.dtype).tiny).unsqueeze(-1)  # (B, E, 1)
    return torch.einsum("bge,bgc->bec", w, tags) / total  # (B, E, C)


def prompt_routing(weights: torch.Tensor, tag_mask: torch.Tensor) -> torch.Tensor:
    """Routing per prompt [B,E]: the mean over its real tags (each text encoding has at least one)."""
    n = tag_mask.float().sum(1).clamp_min(1.0).unsqueeze(-1)  # (B, 1)
    return weights.sum(1) / n


def tag_balance_loss(weights: torch.Tensor, tag_mask: torch.Tensor) -> torch.Tensor:
    """``E · Σ_e p̄_e² − 1`` with p̄ the mean routing row over the batch's real tags; 0 for an even load."""
    rows = weights[tag_mask]  # (N, E) real tags only
    mean = rows.float().mean(0)
    return weights.shape[-1] * mean.pow(2).sum() - 1.0


def prior_logits(tag_category: torch.Tensor, num_experts: int, weight: float) -> torch.Tensor:
    """Category indices [B,G] (an expert's index, or ``num_experts`` for none) → logit bias [B,G,E]:
    ``weight`` on the category's expert, 0 elsewhere (``moas.models.tag_prior`` makes the indices)."""
    onehot = F.one_hot(tag_category.long().clamp(0, num_experts), num_experts + 1)  # (B, G, E+1)
    return onehot[..., :num_experts].float() * weight
