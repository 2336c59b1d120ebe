"""AdaptiveTrainingSystem: nudge the learning rate from the recent loss curve (the original's rules).

Every ``window`` optimizer steps (10) it looks at the losses of that window:

* convergence rate = relative drop of the mean loss from the window's first half to its second half;
  below 0.01 (a plateau) the learning rate is multiplied by 0.9, above 0.05 (fast progress) by 1.05,
  but never above ``max_lr`` (1e-3);
* stability score = 1 / (1 + coefficient of variation of the window's losses); below 0.5 (a noisy,
  jumpy loss) the learning rate is multiplied by 0.85.

The result is a multiplier on top of the warm-up/cosine schedule, kept within [``min_scale``, ∞). Its state
(the multiplier and the current window) is part of every checkpoint, so a resumed run adapts identically.
"""

from __future__ import annotations

import logging
import statistics

log = logging.getLogger(__name__)


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
