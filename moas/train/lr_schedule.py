"""The learning-rate schedule: the original's linear warm-up (17 % of the run), then
``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`` with T_0 scaled to the run length
(65 of 260 epochs in the original). The schedule advances per optimizer step with fractional epochs,
so it behaves the same for any dataset size.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts


class WarmupCosineRestarts:
    def __init__(
        self,
        optimizer: Optimizer,
        epochs: int,
        steps_per_epoch: int,
        warmup_fraction: float,
        restart_fraction: float,
        restart_mult: int,
        eta_min: float,
    ) -> None:
        self.optimizer = optimizer
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.warmup_steps = round(warmup_fraction * epochs * self.steps_per_epoch)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        t0 = max(1, round(restart_fraction * epochs))
        self.cosine = CosineAnnealingWarmRestarts(optimizer, T_0=t0, T_mult=restart_mult, eta_min=eta_min)
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        n = self.step_count
        if n < self.warmup_steps:
            for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                g["lr"] = base * (n + 1) / self.warmup_steps
        else:
            self.cosine.step((n - self.warmup_steps) / self.steps_per_epoch)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "cosine": self.cosine.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved step. The place on the curve is recomputed from this schedule's own length
        and learning rate (not the saved cosine state), so a run resumed with another ``--epochs`` follows
        the schedule of its new length; with the same settings it continues exactly."""
        self.step_count = int(state["step_count"])
        self._apply()
