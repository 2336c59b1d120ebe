"""The original's two self-adjusting systems, both outside the gradient: the learning rate from the loss
curve, and the routing from the experts' measured load.

**AdaptiveTrainingSystem**: nudge the learning rate from the recent loss curve (the original's rules).

Every ``window`` optimizer steps (10) it looks at the losses of that window:

* convergence rate = relative drop of the mean loss from the window's first half to its second half;
  below 0.01 (a plateau) the learning rate is multiplied by 0.9, above 0.05 (fast progress) by 1.05,
  but never above ``max_lr`` (1e-3);
* stability score = 1 / (1 + coefficient of variation of the window's losses); below 0.5 (a noisy,
  jumpy loss) the learning rate is multiplied by 0.85.

The result is a multiplier on top of the warm-up/cosine schedule, kept within [``min_scale``, ∞). Its state
(the multiplier and the current window) is part of every checkpoint, so a resumed run adapts identically.

**AdvancedContinuousLearning**: adjust routing and expert weights between epochs from tracked performance.

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
import statistics

import torch

from moas.models.moe import EnhancedMoE

log = logging.getLogger(__name__)


# --- the learning rate from the loss curve --------------------------------------------------------


class AdaptiveTrainingSystem:
    def __init__(self, window: int = 10, max_lr: float = 1e-3, min_scale: float = 0.05) -> None:
        if window < 4:
            raise ValueError("the adaptive window needs at least 4 steps")
        self.window = window
        self.max_lr = max_lr
        self.min_scale = min_scale
        self.scale = 1.0
        self.losses: list[float] = []
        self.last: dict[str, float] = {}

    @staticmethod
    def convergence_rate(losses: list[float]) -> float:
        half = len(losses) // 2
        first, second = statistics.fmean(losses[:half]), statistics.fmean(losses[half:])
        return (first - second) / max(abs(first), 1e-12)

    @staticmethod
    def stability_score(losses: list[float]) -> float:
        mean = statistics.fmean(losses)
        cv = statistics.pstdev(losses) / max(abs(mean), 1e-12)
        return 1.0 / (1.0 + cv)

    def observe(self, loss: float, scheduled_lr: float) -> float:
        """Record one step's loss; every ``window`` steps update the multiplier. Returns the lr to use."""
        self.losses.append(float(loss))
        if len(self.losses) >= self.window:
            conv = self.convergence_rate(self.losses)
            stab = self.stability_score(self.losses)
            factor = 1.0
            if conv < 0.01:
                factor *= 0.9
            elif conv > 0.05:
                factor *= 1.05
            if stab < 0.5:
                factor *= 0.85
            self.scale = max(self.min_scale, self.scale * factor)
            self.last = {"convergence_rate": conv, "stability_score": stab, "lr_scale": self.scale}
            log.debug("adaptive lr: convergence %.4f, stability %.3f → scale %.3f", conv, stab, self.scale)
            self.losses.clear()
        return self.lr(scheduled_lr)

    def lr(self, scheduled_lr: float) -> float:
        lr = scheduled_lr * self.scale
        # The 1.05 rule is capped at max_lr; a schedule that already starts above it is left alone.
        return min(lr, max(self.max_lr, scheduled_lr)) if self.scale > 1 else lr

    def state_dict(self) -> dict:
        return {"scale": self.scale, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.losses = [float(x) for x in state["losses"]]


# --- routing and expert weights from the measured load --------------------------------------------


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
