"""Bridges: the original's dimension bridge, and the bridge from brain modules to cross-attention tokens.

``DimensionBridge``: Linear(1024→512) → LayerNorm → ReLU. Here its 1024-d input is the MoE output joined
with the GNN's graph features (512 + 512); its output is the ``embedding`` the art experts read.

``ContextBridge``: every brain module's output (any width) becomes one 768-d token appended to the text
context, through a LayerNorm and a *zero-initialised* projection — so an untrained brain contributes exactly
zero tokens (never noise), and the diffusion loss trains the projections, then everything upstream. It
also gives the pooled vector a zero-initialised residual from the MoE output.
"""

from __future__ import annotations

import torch
from torch import nn


class DimensionBridge(nn.Module):
    def __init__(self, in_dim: int = 1024, out_dim: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.ReLU())

    def forward(self, moe_output: torch.Tensor, graph_features: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([moe_output, graph_features], -1))  # (B, 512)


class ContextBridge(nn.Module):
    def __init__(
        self, widths: dict[str, int], dim: int = 768, pooled_from: str | None = "moe_output"
    ) -> None:
        super().__init__()
        self.keys = tuple(widths)
        self.norms = nn.ModuleDict({k: nn.LayerNorm(w) for k, w in widths.items()})
        self.projections = nn.ModuleDict({k: nn.Linear(w, dim) for k, w in widths.items()})
        for p in self.projections.values():
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)
        self.pooled_from = pooled_from if pooled_from in widths else None
        self.pooled_residual = nn.Linear(widths[pooled_from], dim) if self.pooled_from else None
        if self.pooled_residual is not None:
            nn.init.zeros_(self.pooled_residual.weight)
            nn.init.zeros_(self.pooled_residual.bias)

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named module outputs ([B,W] or [B,N,W]) → extra_context [B,K,768] (+ mask), pooled_delta [B,768]."""
        tokens = []
        for k in self.keys:
            x = inputs[k]
            if x.dim() == 3:  # per-node outputs (e.g. expert states): pool to one vector
                x = x.mean(1)
            tokens.append(
                self.projections[k](self.norms[k](x))
            )  # (B, 768); each projection's bias marks its module
        ctx = torch.stack(tokens, 1)  # (B, N, 768)
        out = {
            "extra_context": ctx,
            "extra_context_mask": torch.ones(ctx.shape[:2], dtype=torch.bool, device=ctx.device),
        }
        if self.pooled_residual is not None:
            out["pooled_delta"] = self.pooled_residual(self.norms[self.pooled_from](inputs[self.pooled_from]))
        return out


class MemoryBridge(nn.Module):
    """Panel memory → a zero-initialised residual on the pooled conditioning vector (a direct route).

    The memory expert alone is one of 14 experts inside one pooled MoE output, behind a gate that starts at
    zero; measured after a demo-length run (``bench/panels.py``) the memory changed the U-Net's inputs by
    ~1e-5 relative. This bridge gives the previous panels a direct path: the masked mean of the memory
    tokens, LayerNorm'd, through a zero-initialised Linear into ``pooled`` (which drives the U-Net's time /
    class embedding, where global attributes such as hair colour live). Zero-initialised, so a model that
    never trained on sequences is exactly unchanged; rows without panels get no residual.
    """

    def __init__(self, dim: int = 512, out_dim: int = 768, context: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)
        # context=True: a second zero-initialised route into the first cross-attention token (moas.models
        # .conditioning: ``context_delta``), where the U-Net can read the panel memory per pixel.
        # skip_init: built without drawing from the RNG, so adding this route leaves every other module's
        # initial weights (and a run without sequences) exactly as before.
        self.context_proj = nn.utils.skip_init(nn.Linear, dim, out_dim) if context else None
        for p in (self.proj, self.context_proj):
            if p is not None:
                nn.init.zeros_(p.weight)
                nn.init.zeros_(p.bias)

    def forward(
        self, memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        if memory is None:
            return {"pooled_delta": None, "context_delta": None}
        m = memory_mask.to(memory.dtype).unsqueeze(-1)  # (B, K, 1)
        pooled = (memory * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D) masked mean over the panels
        has = memory_mask.any(1, keepdim=True).to(memory.dtype)  # (B, 1): rows without panels get nothing
        h = self.norm(pooled)
        ctx = self.context_proj(h) * has if self.context_proj is not None else None
        return {"pooled_delta": self.proj(h) * has, "context_delta": ctx}  # (B, 768) each
