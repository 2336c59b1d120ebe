"""Where a training step's wall time goes: exclusive seconds per part of moas's step, and of the peer's.

Used by ``bench/peer.py --profile``. Each probe wraps one function for the length of a ``with`` block and
charges its wall time to a named part; a probe inside another pauses the outer one (the parts are
exclusive, as in ``moas.monitor.phases.PhaseClock``, which does the bookkeeping). The time no probe covers
is the loop itself ("other": the batch loop, tqdm, Python between the parts).

The parts that are the model's own work — forward, the loss, backward, and the optimizer as both sides
configure it (AMSGrad AdamW's update, gradient clipping, zeroing the gradients, the EMA update) — are what
any loop training this network with these settings pays; everything else is the trainer's overhead,
reported as a share of the step.
"""

from __future__ import annotations

import functools
import statistics
import time
from contextlib import ExitStack
from typing import Any

from moas.monitor.phases import PhaseClock

# The model's own work: what a bare loop pays too.
MODEL_PARTS = ("forward", "loss", "backward", "optimizer update", "gradient clipping", "zero_grad", "EMA")


class Probes:
    """Wrap attributes of objects/classes so their calls are timed into one clock."""

    def __init__(self) -> None:
        self.clock = PhaseClock()
        self._stack = ExitStack()

    def wrap(self, owner: Any, name: str, part: str) -> None:
        original = getattr(owner, name)
        clock = self.clock

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with clock(part):
                return original(*args, **kwargs)

        setattr(owner, name, timed)
        self._stack.callback(setattr, owner, name, original)

    def restore(self) -> None:
        self._stack.close()


def moas_probes() -> Probes:
    """Probes on every part of moas's generator step (classes patched: they apply to the next run built)."""
    import torch

    import moas.train.loop as loop_mod
    import moas.train.step as step_mod
    import moas.train.trained_net as tn
    from moas.diffusion.objective import DiffusionObjective
    from moas.resources import EnhancedResourceManager as ResourceManager
    from moas.train.inputs import StepDraws, TrainingInputs

    p = Probes()
    p.wrap(StepDraws, "draw", "random draws")
    p.wrap(TrainingInputs, "images", "inputs: images")
    p.wrap(TrainingInputs, "__call__", "inputs: captions, text bank")
    p.wrap(DiffusionObjective, "__call__", "loss")  # noising, target, Min-SNR weights (forward inside)
    p.wrap(step_mod.GeneratorStep, "_losses", "extra losses, terms")
    p.wrap(step_mod.GeneratorStep, "_guard", "guard: loss flag")
    p.wrap(tn.TrainedNet, "backward", "backward")
    p.wrap(tn, "average_gradients", "gradient averaging")
    p.wrap(torch.nn.utils, "clip_grad_norm_", "gradient clipping")
    p.wrap(tn, "host_read", "guard: the step's host read")
    p.wrap(tn.TrainedNet, "_optimizer_step", "optimizer update")
    p.wrap(tn.EMA, "update", "EMA")
    p.wrap(step_mod.GeneratorStep, "_side_steps", "side networks")
    p.wrap(step_mod, "report_step", "report: log, TensorBoard, bar")
    p.wrap(ResourceManager, "snapshot", "report: resource reading")
    p.wrap(ResourceManager, "maybe_cleanup", "report: cleanup check")
    p.wrap(loop_mod.Trainer, "_at_boundary", "step boundary")
    p.wrap(torch.optim.lr_scheduler.LRScheduler, "step", "lr schedule")
    p.wrap(torch.optim.Optimizer, "zero_grad", "zero_grad")
    _wrap_forward(p)
    _wrap_loader(p, loop_mod)
    return p


def _wrap_forward(p: Probes) -> None:
    from moas.models.generator import MoasGenerator

    p.wrap(MoasGenerator, "forward", "forward")


def _wrap_loader(p: Probes, loop_mod) -> None:
    """The batch loop's wait for the next batch (the DataLoader's ``__next__``)."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    p.wrap(_BaseDataLoaderIter, "__next__", "data: next batch")


def per_step_ms(
    seconds: dict[str, float], wall: float, steps: int, durations: list[float] | None = None
) -> dict[str, Any]:
    """Milliseconds per step of each part, "other" for the wall time no probe covered, and the overhead's
    share (every part but the model's own work) of the step; with ``durations`` (seconds of each step), their
    median too — robust to the few steps a VM's neighbours slow down."""
    parts = {k: 1000 * v / steps for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}
    parts["other (loop, Python between parts)"] = max(0.0, 1000 * wall / steps - sum(parts.values()))
    step_ms = 1000 * wall / steps
    model = sum(v for k, v in parts.items() if k in MODEL_PARTS)
    return {
        "step_ms": round(step_ms, 2),
        "parts_ms": {k: round(v, 2) for k, v in parts.items()},
        "model_ms": round(model, 2),
        "overhead_ms": round(step_ms - model, 2),
        "overhead_share": round((step_ms - model) / step_ms, 4),
        "median_step_ms": round(1000 * statistics.median(durations), 2) if durations else None,
    }


class StepWindow:
    """The probes' totals over steps ``skip + 1 … steps`` of a run: the clock is reset when step ``skip``
    ends and read when step ``steps`` ends, so set-up, warm-up and the final save fall outside."""

    def __init__(self, p: Probes, skip: int, steps: int) -> None:
        import moas.train.loop as loop_mod

        self.skip, self.steps, self.seen = skip, steps, 0
        self.durations: list[float] = []  # each timed step's wall seconds
        self.last = 0.0  # when the previous step ended
        self.between = None  # called after each timed step, outside the timing
        self.seconds: dict[str, float] = {}
        self.wall = 0.0
        clock, original = p.clock, loop_mod.Trainer._at_boundary
        window = self

        def marked(trainer, *args, **kwargs):
            out = original(trainer, *args, **kwargs)
            window.seen += 1
            now = time.perf_counter()
            if window.skip < window.seen <= window.steps:
                window.durations.append(now - window.last)
                if window.between is not None:  # e.g. one peer step, outside moas's timing
                    window.between()
                    now = time.perf_counter()
            window.last = now
            if window.seen == window.skip:
                clock.seconds, clock.started = {}, time.perf_counter()
            elif window.seen == window.steps:
                window.seconds, window.wall = dict(clock.seconds), time.perf_counter() - clock.started
            return out

        loop_mod.Trainer._at_boundary = marked
        p._stack.callback(setattr, loop_mod.Trainer, "_at_boundary", original)

    def result(self) -> dict[str, Any]:
        return per_step_ms(self.seconds, self.wall, self.steps - self.skip, self.durations)
