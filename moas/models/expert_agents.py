"""The 14 expert agents of the MoE: one reference module per expert and their batched equivalent.

``EnhancedExpertAgent`` is one expert exactly as the original describes it (input_proj 768→512, two
pre-norm residual layers, context attention ×0.5, comm_layer ×0.3, output_proj × expert_weight).
``BatchedExperts`` holds the same weights for all 14 experts stacked along a leading expert axis
([E, out, in], the ``nn.Linear`` layout) and runs them as one einsum computation instead of 14 module
calls. ``agent(i)`` exports expert ``i`` as an ``EnhancedExpertAgent``; the tests check both agree.

The batched context attention uses an exact algebraic rearrangement to avoid projecting the context
once per expert: with a single query per expert, ``q·(W_k c + b_k) = (W_kᵀ q)·c + q·b_k`` and, because the
attention weights sum to one, ``Σ a_l (W_v c_l + b_v) = W_v (Σ a_l c_l) + b_v``. The constant ``q·b_k``
does not change the softmax, so it is dropped. The cost is O(B·E·D²) instead of O(B·E·L·D²).

Panel memory: built with ``memory_expert=i``, expert ``i`` (the original's "memory" expert,
temporal consistency across panels) also attends to memory tokens [B,M,D] — the previous panels' features
from ``moas.models.panel_memory.PanelMemory`` — with its own attention weights, and adds
``tanh(memory_gate) · 0.5 · attended``. ``memory_gate`` starts at 0, so a model that never saw sequences is
exactly unchanged by memory (the added term is 0·finite), and a sample whose memory mask is all False gets
no memory term at all. The memory attention is a plain per-token projection (one expert, a handful of
tokens), so the algebraic shortcut above is not needed there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class EnhancedExpertAgent(nn.Module):
    """One expert: x [B,in] (+ context [B,L,D]) → hidden state [B,D]."""

    def __init__(self, in_dim: int = 768, dim: int = 512, heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.input_proj = nn.Linear(in_dim, dim)
        self.layer1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout))
        self.layer2 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True, dropout=dropout)
        self.comm_layer = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU())
        self.output_proj = nn.Linear(dim, dim)
        self.expert_weights = nn.Parameter(torch.ones(1))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.input_proj(x)  # (B, D)
        h = h + self.layer1(h)
        h = h + self.layer2(h)
        if context is not None:
            pad = None if context_mask is None else ~context_mask
            att = self.attention(h.unsqueeze(1), context, context, key_padding_mask=pad, need_weights=False)[
                0
            ]
            h = h + att.squeeze(1) * 0.5  # (B, D)
        h = h + self.comm_layer(h) * 0.3
        return self.output_proj(h) * self.expert_weights  # (B, D)


def _stack(e: int, out_dim: int, in_dim: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Stacked weights [E, out, in] and biases [E, out] with nn.Linear's default initialisation."""
    w = torch.empty(e, out_dim, in_dim)
    b = torch.empty(e, out_dim)
    bound = 1 / math.sqrt(in_dim)
    for i in range(e):
        nn.init.kaiming_uniform_(w[i], a=math.sqrt(5))
        nn.init.uniform_(b[i], -bound, bound)
    return nn.Parameter(w), nn.Parameter(b)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-expert linear map: x [B,E,in], w [E,out,in], b [E,out] → [B,E,out]."""
    return torch.einsum("bei,eoi->beo", x, w) + b


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:]) * w + b  # (B, E, D) with per-expert affine [E, D]


class BatchedExperts(nn.Module):
    """All experts in one computation; numerically the same as ``num_experts`` EnhancedExpertAgents."""

    def __init__(
        self,
        num_experts: int = 14,
        in_dim: int = 768,
        dim: int = 512,
        heads: int = 8,
        dropout: float = 0.1,
        memory_expert: int | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError("expert width must be divisible by the number of attention heads")
        e = num_experts
        self.num_experts, self.in_dim, self.dim, self.heads, self.dropout = e, in_dim, dim, heads, dropout
        self.in_w, self.in_b = _stack(e, dim, in_dim)
        self.l1_ln_w, self.l1_ln_b = nn.Parameter(torch.ones(e, dim)), nn.Parameter(torch.zeros(e, dim))
        self.l1_w, self.l1_b = _stack(e, dim, dim)
        self.l2_ln_w, self.l2_ln_b = nn.Parameter(torch.ones(e, dim)), nn.Parameter(torch.zeros(e, dim))
        self.l2_w, self.l2_b = _stack(e, dim, dim)
        # Attention in nn.MultiheadAttention's layout: in_proj [3D, D] (q, k, v), out_proj [D, D].
        qkv = torch.empty(e, 3 * dim, dim)
        for i in range(e):
            nn.init.xavier_uniform_(qkv[i])
        self.attn_in_w = nn.Parameter(qkv)
        self.attn_in_b = nn.Parameter(torch.zeros(e, 3 * dim))
        self.attn_out_w, _ = _stack(e, dim, dim)
        self.attn_out_b = nn.Parameter(torch.zeros(e, dim))
        self.comm_w, self.comm_b = _stack(e, dim, dim)
        self.comm_ln_w, self.comm_ln_b = nn.Parameter(torch.ones(e, dim)), nn.Parameter(torch.zeros(e, dim))
        self.out_w, self.out_b = _stack(e, dim, dim)
        self.expert_weights = nn.Parameter(torch.ones(e))  # learnable output scale per expert
        self.memory_expert = memory_expert
        if memory_expert is not None:
            if not 0 <= memory_expert < e:
                raise ValueError(f"memory_expert must be an expert index below {e}")
            # The memory expert's own attention over panel memory, in nn.MultiheadAttention's layout.
            mem = torch.empty(3 * dim, dim)
            nn.init.xavier_uniform_(mem)
            self.mem_in_w = nn.Parameter(mem)
            self.mem_in_b = nn.Parameter(torch.zeros(3 * dim))
            self.mem_out = nn.Linear(dim, dim)
            nn.init.zeros_(self.mem_out.bias)
            self.memory_gate = nn.Parameter(torch.zeros(()))  # tanh(0) = 0: no effect until trained

    def _attend(self, h: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One query per expert over the shared context (see module docstring for the algebra)."""
        b, e, d = h.shape
        nh, dh = self.heads, d // self.heads
        wq, wk, wv = self.attn_in_w.split(d, dim=1)  # each (E, D, D)
        bq, _, bv = self.attn_in_b.split(d, dim=1)  # each (E, D)
        q = _linear(h, wq, bq).view(b, e, nh, dh)  # (B, E, H, dh)
        q_ctx = torch.einsum("behk,ehkc->behc", q, wk.view(e, nh, dh, d))  # (B, E, H, D) = W_kᵀ q
        scores = torch.einsum("behc,blc->behl", q_ctx, context) / math.sqrt(dh)  # (B, E, H, L)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = F.dropout(scores.softmax(-1), self.dropout, self.training)  # (B, E, H, L)
        pooled = torch.einsum("behl,blc->behc", attn, context)  # (B, E, H, D)
        v = torch.einsum("behc,ehkc->behk", pooled, wv.view(e, nh, dh, d)).reshape(b, e, d)
        if self.training and self.dropout > 0:
            # With attention dropout the weights no longer sum to one; the bias term is then Σ a_l · b_v.
            v = v + attn.sum(-1).repeat_interleave(dh, -1) * bv
        else:
            v = v + bv
        return _linear(v, self.attn_out_w, self.attn_out_b)  # (B, E, D)

    def _attend_memory(
        self, h: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The memory expert's query h [B,D] over memory [B,M,D]; rows with no valid token give 0."""
        b, d = h.shape
        m, nh, dh = memory.shape[1], self.heads, d // self.heads
        wq, wk, wv = self.mem_in_w.split(d, dim=0)  # each (D, D)
        bq, bk, bv = self.mem_in_b.split(d, dim=0)
        q = F.linear(h, wq, bq).view(b, nh, 1, dh)  # (B, H, 1, dh)
        k = F.linear(memory, wk, bk).view(b, m, nh, dh).transpose(1, 2)  # (B, H, M, dh)
        v = F.linear(memory, wv, bv).view(b, m, nh, dh).transpose(1, 2)  # (B, H, M, dh)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)  # (B, H, 1, M)
        if mask is None:
            mask = torch.ones(b, m, dtype=torch.bool, device=memory.device)
        has_any = mask.any(1)  # (B,)
        # An all-masked row would softmax over -inf only (NaN); it attends uniformly instead and is zeroed.
        valid = mask | ~has_any[:, None]  # (B, M)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        attn = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = (attn @ v).reshape(b, d)  # (B, D)
        return self.mem_out(out) * has_any[:, None].to(out.dtype)  # (B, D)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B,in] shared by all experts, or [B,E,in] one input per expert (per-tag routing), (+ context
        [B,L,D], mask [B,L] True = attend; + panel memory [B,M,D], mask [B,M]) → expert states [B,E,D].
        Memory is used only when built with ``memory_expert``."""
        p, train = self.dropout, self.training
        if x.dim() == 3:
            h = _linear(x, self.in_w, self.in_b)  # (B, E, D)
        else:
            h = torch.einsum("bi,eoi->beo", x, self.in_w) + self.in_b  # (B, E, D)
        h = h + F.dropout(
            F.gelu(_linear(_layer_norm(h, self.l1_ln_w, self.l1_ln_b), self.l1_w, self.l1_b)), p, train
        )
        h = h + F.dropout(
            F.gelu(_linear(_layer_norm(h, self.l2_ln_w, self.l2_ln_b), self.l2_w, self.l2_b)), p, train
        )
        if context is not None:
            h = h + self._attend(h, context, context_mask) * 0.5
        if memory is not None and self.memory_expert is not None and memory.shape[1] > 0:
            i = self.memory_expert
            term = torch.tanh(self.memory_gate) * 0.5 * self._attend_memory(h[:, i], memory, memory_mask)
            h = torch.cat([h[:, :i], (h[:, i] + term).unsqueeze(1), h[:, i + 1 :]], 1)  # (B, E, D)
        h = (
            h
            + F.gelu(_layer_norm(_linear(h, self.comm_w, self.comm_b), self.comm_ln_w, self.comm_ln_b)) * 0.3
        )
        return _linear(h, self.out_w, self.out_b) * self.expert_weights[:, None]  # (B, E, D)

    # ---- conversion to and from per-expert modules (used by the equivalence test) -----------------

    def _pairs(self, agent: EnhancedExpertAgent) -> list[tuple[torch.Tensor, nn.Parameter]]:
        a = agent
        return [
            (a.input_proj.weight, self.in_w),
            (a.input_proj.bias, self.in_b),
            (a.layer1[0].weight, self.l1_ln_w),
            (a.layer1[0].bias, self.l1_ln_b),
            (a.layer1[1].weight, self.l1_w),
            (a.layer1[1].bias, self.l1_b),
            (a.layer2[0].weight, self.l2_ln_w),
            (a.layer2[0].bias, self.l2_ln_b),
            (a.layer2[1].weight, self.l2_w),
            (a.layer2[1].bias, self.l2_b),
            (a.attention.in_proj_weight, self.attn_in_w),
            (a.attention.in_proj_bias, self.attn_in_b),
            (a.attention.out_proj.weight, self.attn_out_w),
            (a.attention.out_proj.bias, self.attn_out_b),
            (a.comm_layer[0].weight, self.comm_w),
            (a.comm_layer[0].bias, self.comm_b),
            (a.comm_layer[1].weight, self.comm_ln_w),
            (a.comm_layer[1].bias, self.comm_ln_b),
            (a.output_proj.weight, self.out_w),
            (a.output_proj.bias, self.out_b),
        ]

    @torch.no_grad()
    def agent(self, i: int) -> EnhancedExpertAgent:
        """Expert ``i`` as a stand-alone EnhancedExpertAgent with the same weights."""
        a = EnhancedExpertAgent(self.in_dim, self.dim, self.heads, self.dropout).to(self.in_w.device)
        for dst, src in self._pairs(a):
            dst.copy_(src[i])
        a.expert_weights.copy_(self.expert_weights[i : i + 1])
        return a

    @torch.no_grad()
    def load_agent(self, i: int, agent: EnhancedExpertAgent) -> None:
        """Copy an EnhancedExpertAgent's weights into slot ``i``."""
        for src, dst in self._pairs(agent):
            dst[i].copy_(src)
        self.expert_weights[i].copy_(agent.expert_weights[0])
