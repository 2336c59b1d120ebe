"""AdvancedContinuousLearning: adjust routing and expert weights between epochs from tracked performance.

No gradients and no retraining: after each epoch it reads the MoE's per-expert statistics and
  * nudges ``balance_bias`` (a logit offset added before the routing softmax) against the measured load:
    bias_e −= rate · clamp((load_e − 1/E) / (1/E), −1, 1), so an over-used expert is routed to less and a
    starved one more (auxiliary-loss-free balancing, as in DeepSeek-V3);
  * rescales each expert's learnable output weight by its success rate relative to the mean:
    w_e ← clamp(w_e · (1 + weight_rate · (s_e − s̄)), min_weight, max_weight).
The load is the mean routing weight over the forward calls since the previous update (the MoE's
``load_sum``/``load_calls`` buffers, which checkpoints save, so a resumed run adjusts exactly the same).
"""

from __future__ import annotations

import logging

import torch

from moas.models.moe import EnhancedMoE

log = logging.getLogger(__name__)


class AdvancedContinuousLearning:
    def __init__(
        self, rate: float = 0.5, weight_rate: float = 0.1, min_weight: float = 0.5, max_weight: float = 2.0
    ) -> None:
        self.rate = rate
        self.weight_rate = weight_rate
        self.min_weight, self.max_weight = min_weight, max_weight

    @torch.no_grad()
    def update(self, moe: EnhancedMoE) -> dict[str, list[float]]:
        """One between-epoch adjustment; returns the load, bias and expert weights it used and set."""
        if float(moe.load_calls) == 0:
            return {}
        e = moe.num_experts
        load = (moe.load_sum / moe.load_calls).to(moe.balance_bias.dtype)  # (E,)
        moe.load_sum.zero_()
        moe.load_calls.zero_()
        imbalance = ((load - 1.0 / e) * e).clamp(-1.0, 1.0)
        moe.balance_bias.sub_(self.rate * imbalance.to(moe.balance_bias.dtype))
        moe.balance_bias.sub_(moe.balance_bias.mean())  # only differences matter to the softmax
        w = moe.experts.expert_weights
        s = moe.success_rate.to(w.device, w.dtype)
        w.mul_(1 + self.weight_rate * (s - s.mean())).clamp_(self.min_weight, self.max_weight)
        out = {"load": load.tolist(), "bias": moe.balance_bias.tolist(), "expert_weights": w.tolist()}
        log.info(
            "Continuous learning: expert load min %.3f / max %.3f (uniform %.3f); routing bias adjusted.",
            float(load.min()),
            float(load.max()),
            1.0 / e,
        )
        return out
