"""Fault injection for the fault-tolerance tests: ``MOAS_INJECT="oom@3,nan_loss@5,inf_grad@7,crash@9"``.

Each entry fires once, on the micro-batch whose 1-based count (over this process's run) is given:
``oom`` raises ``torch.OutOfMemoryError`` before the forward pass, ``nan_loss`` replaces the loss with NaN,
``inf_grad`` writes +inf into one gradient after the backward pass, ``crash`` raises RuntimeError, and
``slow_save`` makes every checkpoint save sleep this many tenths of a second (to hit it with a signal).
``MOAS_INJECT_SAVE_DELAY=S`` holds every atomic write (``moas.io``) open for S seconds with its temp file
complete but not yet renamed — the window a kill -9 "during a save" hits. This class is the one seam for
all of them: the training run builds one and asks it. Unset (the normal case) it costs one dictionary
lookup per batch.
"""

from __future__ import annotations

import os
import time

import torch

from moas import io
from moas.errors import ConfigError

KINDS = ("oom", "nan_loss", "inf_grad", "crash", "slow_save")


def parse(spec: str) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, at = part.partition("@")
        if kind not in KINDS or not at.isdigit():
            raise ConfigError(f"MOAS_INJECT entry {part!r} is not KIND@N with KIND one of {', '.join(KINDS)}")
        out.setdefault(kind, set()).add(int(at))
    return out


class FaultInjector:
    def __init__(self, spec: str | None = None, save_delay: str | None = None) -> None:
        self.plan = parse(os.environ.get("MOAS_INJECT", "") if spec is None else spec)
        self.count = 0  # micro-batches seen
        delay = os.environ.get("MOAS_INJECT_SAVE_DELAY", "") if save_delay is None else save_delay
        try:
            seconds = float(delay or 0)
        except ValueError:
            raise ConfigError(f"MOAS_INJECT_SAVE_DELAY={delay!r} is not a number of seconds.") from None
        io.set_before_rename_hook((lambda: time.sleep(seconds)) if seconds > 0 else None)

    def next_batch(self) -> None:
        self.count += 1
        if self.fires("oom"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        if self.fires("crash"):
            raise RuntimeError("injected crash")

    def fires(self, kind: str) -> bool:
        hit = self.count in self.plan.get(kind, ())
        if hit:
            self.plan[kind].discard(self.count)
        return hit

    def save_delay(self) -> float:
        return max(self.plan.get("slow_save", {0})) / 10
