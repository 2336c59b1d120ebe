"""Step values read from the device in batches (``train.read_every`` > 1).

A step's loss, loss terms, gradient norm, the side networks' scalars and every network's "finite" flag stay
on the device; the trainer reads all of them for ``read_every`` steps in one transfer, then logs each step
under its own number and accounts for the skipped ones. On a GPU this removes the host–device sync that one
read per step costs (the host waits for the step to finish before it can queue the next one); the guard
itself decides on the device (``TrainedNet.deferred``). On the CPU a read costs nothing, so the CPU profile
reads every step.

What changes when values are read late: a skipped step still counts as a step (the step counter and the
learning-rate schedule advance; its weights, moments and EMA do not change), its warning comes at the next
read, and a network stuck on non-finite losses is stopped at the read after its 20th skip in a row.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from moas.monitor.step_log import StepReport
from moas.train.parts import TrainingParts
from moas.train.trained_net import TrainedNet, wide_float

log = logging.getLogger("moas.train.loop")


@dataclass
class PendingStep:
    report: StepReport  # host fields set; loss, grad_norm, terms and scalars may hold 0-dim device tensors
    brief: str  # the resource line at that step
    ok: torch.Tensor  # the generator's finite flag (0-dim bool, on the device)


def enable_deferred(parts: TrainingParts, read_every: int) -> bool:
    """Let the networks of a generator run decide their guard on the device when ``read_every`` > 1; False
    (and every network reads each step) where that is not possible: an optimizer without the fused
    kernel's skip flag, or the adaptive lr rules, which need each step's loss on the host."""
    if read_every <= 1 or parts.frozen is not None:
        return False
    why = ""
    if parts.adaptive is not None:
        why = "train.adaptive_lr needs each step's loss on the host"
    elif not _fused(parts.net):
        why = "the generator's optimizer has no fused kernel here"
    if why:
        log.info("train.read_every = %d: reading every step instead (%s).", read_every, why)
        return False
    for net in networks(parts):
        net.deferred = _fused(net)
    log.info(
        "Step values are read from the device every %d steps; the NaN guard decides on the device.",
        read_every,
    )
    return True


def _fused(net: TrainedNet) -> bool:
    return bool(net.opt.defaults.get("fused"))


def networks(parts: TrainingParts) -> list[TrainedNet]:
    """Every network the run trains, the generator first."""
    side = parts.side
    nets = [parts.net, side.disc_net, side.enh_net, parts.sr.net if parts.sr is not None else None]
    return [n for n in nets if n is not None]


class StepLedger:
    """The steps whose values have not been read yet, and the one read that turns them into numbers."""

    def __init__(self, nets: list[TrainedNet], device: torch.device) -> None:
        self.nets, self.device = nets, device
        self.steps: list[PendingStep] = []

    def add(self, step: PendingStep) -> None:
        self.steps.append(step)

    def __len__(self) -> int:
        return len(self.steps)

    def forget(self) -> None:
        """Drop the pending steps unread (the device cannot be read after some errors)."""
        self.steps.clear()
        for net in self.nets:
            net.pending.clear()

    def read(self) -> tuple[list[tuple[PendingStep, bool]], dict[str, list[bool]]]:
        """One host read of every pending value: each step with its report in numbers and the generator's flag,
        and each network's flags (by name, in step order). Clears the ledger and the networks' pending
        flags."""
        values: list[torch.Tensor] = []
        wide = wide_float(self.device)

        def slot(v):
            if not torch.is_tensor(v):
                return v
            values.append(v.detach().reshape(()).to(self.device, wide))
            return _Slot(len(values) - 1)

        layout = [
            (
                slot(s.ok),
                slot(s.report.loss),
                slot(s.report.grad_norm),
                {k: slot(v) for k, v in s.report.terms.items()},
                {k: slot(v) for k, v in s.report.scalars.items()},
            )
            for s in self.steps
        ]
        flags = {net.name: [slot(f) for f in net.pending] for net in self.nets}
        read = torch.stack(values).tolist() if values else []
        steps, self.steps = self.steps, []

        def num(v):
            return read[v.i] if isinstance(v, _Slot) else v

        out = []
        for s, (ok, loss, norm, terms, scalars) in zip(steps, layout, strict=True):
            finite = {k: num(v) for k, v in scalars.items()}
            report = replace(
                s.report,
                loss=num(loss),
                grad_norm=num(norm),
                terms={k: num(v) for k, v in terms.items()},
                # A side network's skipped step reports nothing, as when the host decided.
                scalars={k: v for k, v in finite.items() if not isinstance(v, float) or math.isfinite(v)},
            )
            out.append((replace(s, report=report), num(ok) > 0.5))
        return out, {name: [num(f) > 0.5 for f in fl] for name, fl in flags.items()}


@dataclass(frozen=True)
class _Slot:
    i: int  # the value's place in the one read
