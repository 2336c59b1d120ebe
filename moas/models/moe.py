"""EnhancedMoE: 14 expert agents, a learned-temperature router and two-pass cross-expert execution.

Pass 1 runs the 14 experts independently (as one batched computation, ``BatchedExperts``) on the pooled
text vector, each attending to the text tokens. Pass 2 stacks their states [B,14,512] and lets them
exchange information: cross-expert attention (16 heads) ×0.5, then a coordinator ×0.3. The output is the
routing-weighted sum plus 0.5 × a fusion head over all 14 states.

Load balance: ``aux_loss = E · Σ_e p̄_e² − 1`` (p̄ = the batch's mean routing weight per expert). It is 0
for a perfectly even batch load and grows as routing concentrates (it equals the squared coefficient of
variation of the expert loads, the "importance" loss of Shazeer et al. 2017). ``balance_bias`` is a
non-gradient logit offset that ``AdvancedContinuousLearning`` adjusts between epochs.

Per-expert statistics (buffers, so they are saved with checkpoints):
  * ``call_count``: samples the expert processed (every expert sees every sample; routing is dense);
  * ``avg_time``: EMA (α = 0.1) of seconds per forward call. The experts run as one batched computation
    that does the same work for every expert, so each expert is charged 1/14 of the batched time. On CUDA
    this is host-side time (kernels are asynchronous), which under-reports GPU work;
  * ``success_rate``: EMA (α = 0.1) of the fraction of samples on which the expert "succeeded": its output
    is finite and its routing weight is at least half the uniform weight (≥ 1/28), i.e. the router used it.
Routing history: the batch-mean routing row of each forward call, ``deque(maxlen=1000)``.

Per-tag routing: with ``tag_routing=True`` and tag embeddings given, the router scores each tag (plus a
fixed keyword-category bias of ``tag_prior``) and each expert reads the routing-weighted mean of its tags
instead of the pooled text (``moas.models.tag_routing``); ``routing`` is then the mean over the prompt's
real tags, ``tag_routing`` [B,G,E] is returned too, and the load balance is taken over real tags.

Panel memory: with ``memory=True`` the "memory" expert also attends to ``memory`` tokens [B,M,D] (the
previous panels' features, already at the expert width) through a zero-initialised gate
(``BatchedExperts``); without memory tokens the forward is exactly the memory-less one.
"""

from __future__ import annotations

import time
from collections import deque

import torch
from torch import nn

from moas.models.expert_agents import BatchedExperts
from moas.models.tag_routing import (
    normalise_tags,
    prior_logits,
    prompt_routing,
    routed_inputs,
    tag_balance_loss,
    tag_weights,
)

EXPERT_NAMES = (
    "line_art",
    "color",
    "light",
    "anatomy",
    "scene",
    "camera",
    "story",
    "structure",
    "precision",
    "memory",
    "safety",
    "editing",
    "quality",
    "style",
)
STAT_ALPHA = 0.1  # EMA factor of avg_time and success_rate
MIN_TEMPERATURE = 0.05  # the learned temperature is clamped here so the softmax stays finite


class EnhancedMoE(nn.Module):
    """Pooled text x [B,768] (+ tokens [B,L,768]) → moe_output [B,512], expert_states, routing, balance_loss."""

    def __init__(
        self,
        in_dim: int = 768,
        dim: int = 512,
        router_hidden: tuple[int, int] = (1024, 512),
        num_experts: int = len(EXPERT_NAMES),
        expert_heads: int = 8,
        cross_heads: int = 16,
        dropout: float = 0.1,
        context_dim: int | None = 768,
        memory: bool = False,
        tag_routing: bool = False,
        tag_prior: float = 2.0,
    ) -> None:
        super().__init__()
        self.tag_routing, self.tag_prior = tag_routing, tag_prior
        e, h1, h2 = num_experts, router_hidden[0], router_hidden[1]
        self.names = EXPERT_NAMES[:e] if e <= len(EXPERT_NAMES) else tuple(f"expert_{i}" for i in range(e))
        self.router = nn.Sequential(
            nn.Linear(in_dim, h1),
            nn.LayerNorm(h1),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(h1, h2),
            nn.LayerNorm(h2),
            nn.GELU(),
            nn.Linear(h2, e),
        )
        self.temperature = nn.Parameter(torch.ones(1))  # learned: how confident routing is
        self.register_buffer("balance_bias", torch.zeros(e))  # set by AdvancedContinuousLearning
        # The text tokens are 768-d; the experts attend in their own width (the original leaves this implicit).
        self.context_proj = nn.Linear(context_dim, dim) if context_dim else None
        mem_idx = self.names.index("memory") if memory and "memory" in self.names else None
        self.experts = BatchedExperts(e, in_dim, dim, expert_heads, dropout, mem_idx)
        self.cross_attention = nn.MultiheadAttention(dim, cross_heads, batch_first=True, dropout=dropout)
        self.coordinator = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU())
        self.fusion = nn.Sequential(
            nn.Linear(dim * e, dim * 4),
            nn.LayerNorm(dim * 4),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim * 4, dim * 2),
            nn.LayerNorm(dim * 2),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim * 2, dim),
        )
        self.register_buffer("call_count", torch.zeros(e, dtype=torch.float64))
        # Wall-clock timing is not model state: kept out of checkpoints so resumed runs stay bit-identical.
        self.register_buffer("avg_time", torch.zeros(e, dtype=torch.float64), persistent=False)
        self.register_buffer("success_rate", torch.ones(e, dtype=torch.float64))
        # Sum of batch-mean routing rows since the last continuous-learning update (saved, so resume is exact).
        self.register_buffer("load_sum", torch.zeros(e, dtype=torch.float64))
        self.register_buffer("load_calls", torch.zeros((), dtype=torch.float64))
        self.routing_history: deque[torch.Tensor] = deque(maxlen=1000)
        self.routing_calls = 0  # forward calls recorded in total (the deque keeps the last 1000)

    @property
    def num_experts(self) -> int:
        return len(self.names)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights [B,E]; rows sum to 1."""
        temp = self.temperature.clamp_min(MIN_TEMPERATURE)
        logits = self.router(x).float() / temp + self.balance_bias  # (B, E)
        return logits.softmax(-1)

    def route_tags(
        self, tags: torch.Tensor, tag_mask: torch.Tensor, tag_category: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-tag routing weights [B,G,E] of normalised tags [B,G,C]; real rows sum to 1, padding is 0."""
        temp = self.temperature.clamp_min(MIN_TEMPERATURE)
        logits = self.router(tags).float() / temp + self.balance_bias  # (B, G, E)
        if tag_category is not None and self.tag_prior:
            logits = logits + prior_logits(tag_category, self.num_experts, self.tag_prior)
        return tag_weights(logits, tag_mask)

    def forward(
        self,
        pooled: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        tags: torch.Tensor | None = None,
        tag_mask: torch.Tensor | None = None,
        tag_category: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        tag_w = None
        if self.tag_routing and tags is not None:
            tags_n = normalise_tags(tags)  # (B, G, C)
            tag_w = self.route_tags(tags_n, tag_mask, tag_category)  # (B, G, E)
            routing = prompt_routing(tag_w, tag_mask)  # (B, E)
            x = routed_inputs(tags_n, tag_w)  # (B, E, C): each expert reads its own tags
        else:
            routing, x = self.route(pooled), pooled  # (B, E), (B, C)
        ctx = self.context_proj(context) if (context is not None and self.context_proj is not None) else None
        t0 = time.perf_counter()
        states = self.experts(
            x, ctx, context_mask if ctx is not None else None, memory, memory_mask
        )  # (B, E, D)
        elapsed = time.perf_counter() - t0
        # Pass 2: experts read each other, then a shared coordinator.
        attended = self.cross_attention(states, states, states, need_weights=False)[0]
        states = states + attended * 0.5
        states = states + self.coordinator(states) * 0.3  # (B, E, D)
        weighted = (states * routing.to(states.dtype).unsqueeze(-1)).sum(1)  # (B, D)
        fused = self.fusion(states.flatten(1))  # (B, D)
        out = weighted + fused * 0.5
        self._track(routing.detach(), states.detach(), elapsed)
        balance = self.load_balance_loss(routing) if tag_w is None else tag_balance_loss(tag_w, tag_mask)
        result = {"moe_output": out, "expert_states": states, "routing": routing, "balance_loss": balance}
        if tag_w is not None:
            result["tag_routing"] = tag_w  # (B, G, E)
        return result

    def load_balance_loss(self, routing: torch.Tensor) -> torch.Tensor:
        """E · Σ p̄² − 1 ≥ 0, zero when the batch load is even (module docstring)."""
        mean = routing.float().mean(0)  # (E,)
        return self.num_experts * mean.pow(2).sum() - 1.0

    @torch.no_grad()
    def _track(self, routing: torch.Tensor, states: torch.Tensor, elapsed: float) -> None:
        b, e = routing.shape
        finite = torch.isfinite(states).all(-1)  # (B, E)
        used = routing >= 0.5 / e
        success = (finite & used).double().mean(0)  # (E,)
        self.call_count += b
        first = self.avg_time == 0
        share = elapsed / e
        self.avg_time.copy_(torch.where(first, share, (1 - STAT_ALPHA) * self.avg_time + STAT_ALPHA * share))
        self.success_rate.mul_(1 - STAT_ALPHA).add_(STAT_ALPHA * success.to(self.success_rate.device))
        self.load_sum += routing.mean(0).double()
        self.load_calls += 1
        self.routing_history.append(routing.detach().mean(0).float())  # on the device: no sync per forward
        self.routing_calls += 1

    def recent_routing(self, since_call: int = 0) -> torch.Tensor:
        """Batch-mean routing rows [N,E] recorded after forward call number ``since_call`` (at most 1000)."""
        n = min(len(self.routing_history), self.routing_calls - since_call)
        if n <= 0:
            return torch.empty(0, self.num_experts)
        return torch.stack(list(self.routing_history)[-n:]).cpu()

    def mean_routing(self) -> torch.Tensor:
        """Mean routing weight per expert over the recorded history (uniform when there is none)."""
        if not self.routing_history:
            return torch.full((self.num_experts,), 1.0 / self.num_experts)
        return torch.stack(list(self.routing_history)).mean(0).cpu()

    def expert_stats(self) -> dict[str, dict[str, float]]:
        """Per-expert call_count, avg_time, success_rate and mean routing weight, by expert name."""
        mean = self.mean_routing()
        return {
            name: {
                "call_count": float(self.call_count[i]),
                "avg_time": float(self.avg_time[i]),
                "success_rate": float(self.success_rate[i]),
                "mean_routing": float(mean[i]),
                "expert_weight": float(self.experts.expert_weights[i].detach()),
            }
            for i, name in enumerate(self.names)
        }


def describe_routing(routing: torch.Tensor, names: tuple[str, ...] = EXPERT_NAMES) -> str:
    """One line per expert with its routing weight and a bar, highest first (for ``--explain``)."""
    w = routing.float().cpu().tolist()
    order = sorted(range(len(w)), key=lambda i: -w[i])
    return "\n".join(f"  {names[i]:<10} {w[i]:.3f} {'#' * round(w[i] * 100)}" for i in order)
