"""ConditioningEncoder: text encoding → cross-attention context for the U-Net, built on DataFlow.

This is the seam where the conditioning "brain" grows: the 14-expert MoE, the GNN, the understanding
systems and the structure experts are later registered on the same ``DataFlow`` and contribute context
tokens, with no change to this class or to the U-Net. Every registered stage is trained by the diffusion
loss because its output reaches cross-attention.

Inputs (from ``moas.text.encoder.TextEncoding``): ``tokens`` [B,L,768] + ``mask``, ``tags`` [B,G,768] + ``tag_mask``.
Outputs: ``context`` [B,T,768], ``context_mask`` [B,T] (True = attend) and ``pooled`` [B,768].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moas.models.dataflow import DataFlow
from moas.text import TEXT_WIDTH

CONTEXT_DIM = TEXT_WIDTH  # the brain's context vectors are as wide as the text vectors they start from


class ResidualMLP(nn.Module):
    """x + MLP(x) with the last layer zero-initialised: an exact identity until trained."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of ``x`` [B,N,D] where ``mask`` [B,N] is True; zero for rows with no True."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class TextContext(nn.Module):
    """Normalises the two token streams, tags them with a type embedding and refines them residually.

    The tag stream holds one vector per comma-separated tag (order-free); its masked mean is the pooled
    vector, which is additive in the tags, so unseen tag combinations map to sensible points.
    """

    def __init__(
        self, dim: int = CONTEXT_DIM, layers: int = 1, use_tags: bool = True, use_tokens: bool = True
    ) -> None:
        super().__init__()
        self.use_tags, self.use_tokens = use_tags, use_tokens
        # Parameter-free normalisation: the MiniLM streams differ in scale (unit-norm pooled vs raw tokens).
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.type_embed = nn.Parameter(torch.zeros(3, dim))  # pooled / tag / token; zero = identity at init
        self.blocks = nn.ModuleList(ResidualMLP(dim, 2 * dim) for _ in range(layers))

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, tags: torch.Tensor, tag_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        streams, masks = [], []
        tags_n = self.norm(tags) + self.type_embed[1]  # (B, G, D)
        pooled = masked_mean(tags_n, tag_mask) if self.use_tags else masked_mean(self.norm(tokens), mask)
        streams.append((pooled + self.type_embed[0]).unsqueeze(1))  # (B, 1, D)
        masks.append(torch.ones_like(tag_mask[:, :1]))
        if self.use_tags:
            streams.append(tags_n)
            masks.append(tag_mask)
        if self.use_tokens:
            streams.append(self.norm(tokens) + self.type_embed[2])  # (B, L, D)
            masks.append(mask)
        context = torch.cat(streams, 1)  # (B, T, D)
        for block in self.blocks:
            context = block(context)
        return {"context": context, "context_mask": torch.cat(masks, 1), "pooled": pooled}


class ConditioningEncoder(nn.Module):
    """The conditioning graph: a ``DataFlow`` whose stages turn a text encoding into U-Net context.

    Stages registered later may read any key produced earlier (``context``, ``pooled``, …) and may
    append context tokens by producing ``extra_context`` / ``extra_context_mask``; those are concatenated
    to the text context here, so new experts plug in by registration alone.
    """

    def __init__(self, layers: int = 1, use_tags: bool = True, use_tokens: bool = True) -> None:
        super().__init__()
        # Auxiliary losses produced by stages ("module.key" -> weight), summed into ``aux_loss``.
        self.aux_weights: dict[str, float] = {}
        self.flow = DataFlow()
        self.flow.register_module(
            "text_context",
            TextContext(CONTEXT_DIM, layers, use_tags, use_tokens),
            inputs=["tokens", "mask", "tags", "tag_mask"],
            outputs=["context", "context_mask", "pooled"],
        )

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        tags: torch.Tensor,
        tag_mask: torch.Tensor,
        **extra: torch.Tensor,  # inputs of later-registered stages, e.g. style / style_mask, language
    ) -> dict[str, torch.Tensor]:
        out = self.flow(tokens=tokens, mask=mask, tags=tags, tag_mask=tag_mask, **extra)
        context, context_mask = out["context"], out["context_mask"]
        extra = [k for k in out if k.endswith(".extra_context") and out[k] is not None]
        for key in extra:  # contributions of later-registered stages
            module = key.rsplit(".", 1)[0]
            ctx = out[key]  # (B, N, D)
            context = torch.cat([context, ctx], 1)
            m = out.get(
                f"{module}.extra_context_mask", torch.ones(ctx.shape[:2], dtype=torch.bool, device=ctx.device)
            )
            context_mask = torch.cat([context_mask, m], 1)
        for key in [k for k in out if k.endswith(".context_delta") and out[k] is not None]:
            # Zero-initialised residuals on the first context token (the pooled-text token, always
            # attended): a route into cross-attention that is an exact no-op until trained, unlike an
            # appended token, which takes attention mass even when it is zero.
            delta = out[key].to(context.dtype).unsqueeze(1)  # (B, 1, D)
            context = torch.cat([context[:, :1] + delta, context[:, 1:]], 1)
        pooled = out["pooled"]
        for key in [
            k for k in out if k.endswith(".pooled_delta") and out[k] is not None
        ]:  # zero-init residuals
            pooled = pooled + out[key].to(pooled.dtype)
        aux = sum(
            (out[k].float() * w for k, w in self.aux_weights.items() if k in out), context.new_zeros(())
        )
        return {**out, "context": context, "context_mask": context_mask, "pooled": pooled, "aux_loss": aux}
