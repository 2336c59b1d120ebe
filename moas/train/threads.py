"""Intra-op threads on the CPU that follow what other processes leave free.

On a 2-core machine two OpenMP threads spin-wait for each other: when another process holds one core, a
training step takes about three times as long as with one thread, while on an idle machine two threads
are ~1.6 times faster than one (``bench/threads.py``). So the thread count follows the cores the rest of
the machine leaves free: every ``interval_s`` seconds the governor reads the machine's CPU use and this
process's own (with its children, e.g. DataLoader workers) and wants ``round(cores - others)`` threads,
between 1 and the configured maximum. A change needs two readings in a row that agree, so one burst of
another process does not flip it.

On an idle machine the count never moves, so the run computes exactly what a fixed count computes. A
change of the thread count can change float rounding (a parallel reduction splits differently), so a run
whose cores were shared is not bit-identical to one that had the machine to itself; set
``resources.adapt_threads = false`` where that matters more than speed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import psutil
import torch

log = logging.getLogger(__name__)


class ThreadGovernor:
    def __init__(
        self,
        max_threads: int,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        cores: int | None = None,
    ) -> None:
        self.max_threads = max(1, max_threads)
        self.cores = cores or os.cpu_count() or 1
        self.interval_s, self.clock = interval_s, clock
        self.threads = torch.get_num_threads()
        self.changes = 0
        self._process = psutil.Process()
        self._children: dict[int, psutil.Process] = {}
        self._child_base: dict[int, float] = {}  # a child's CPU time when first seen
        self._child_used: dict[int, float] = {}  # ... and what it has used since
        self._gone = 0.0  # CPU-seconds of children that have ended
        self._last: tuple[float, float, float] | None = None
        self._pending: int | None = None
        self._next = clock() + interval_s
        self.read_usage()  # the first reading only sets the baseline

    def _cpu_seconds(self) -> tuple[float, float, float]:
        """(wall time, CPU-seconds the machine has been busy, CPU-seconds of this process and its children).

        Counters of its own, read as differences between two of its calls: ``psutil.cpu_percent`` keeps one
        process-wide baseline that every caller resets (the resource manager reads it each step)."""
        t = psutil.cpu_times()
        # Linux counts guest time inside user time as well; steal (another VM ran) is not free for us.
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        busy = total - t.idle - getattr(t, "iowait", 0.0)
        own = self._process.cpu_times()
        current: dict[int, float] = {}  # each child's CPU-seconds since it was first seen
        for child in self._process.children(recursive=True):
            known = self._children.setdefault(child.pid, child)
            try:
                c = known.cpu_times()
            except psutil.Error:  # it ended meanwhile
                continue
            current[child.pid] = c.user + c.system - self._child_base.setdefault(child.pid, c.user + c.system)
        for pid in self._child_used.keys() - current.keys():  # ended: keep what it used
            self._gone += self._child_used.pop(pid)
            self._children.pop(pid, None)
            self._child_base.pop(pid, None)
        self._child_used.update(current)
        return time.monotonic(), busy, own.user + own.system + self._gone + sum(current.values())

    def read_usage(self) -> tuple[float, float]:
        """(cores busy on the whole machine, cores used by this process and its children) since the last
        reading."""
        now = self._cpu_seconds()
        last, self._last = self._last, now
        if last is None:
            return 0.0, 0.0
        wall = max(now[0] - last[0], 1e-6)
        return (now[1] - last[1]) / wall, (now[2] - last[2]) / wall

    def wanted(self, machine: float, mine: float) -> int:
        others = max(0.0, machine - mine)
        return max(1, min(self.max_threads, int(self.cores - others + 0.5)))

    def poll(self) -> int | None:
        """Called once per optimizer step; the new thread count when it changed, else None."""
        now = self.clock()
        if now < self._next:
            return None
        self._next = now + self.interval_s
        want = self.wanted(*self.read_usage())
        if want == self.threads:
            self._pending = None
            return None
        if self._pending != want:  # the first reading that disagrees: wait for a second one
            self._pending = want
            return None
        self._pending = None
        log.info(
            "Other processes use %s of this machine's %d cores: %d torch thread%s (was %d).",
            "some" if want < self.threads else "less",
            self.cores,
            want,
            "" if want == 1 else "s",
            self.threads,
        )
        torch.set_num_threads(want)
        self.threads = want
        self.changes += 1
        return want


def thread_governor(adapt: bool, device: torch.device, threads: int) -> ThreadGovernor | None:
    """A governor for a CPU run with more than one thread and ``resources.adapt_threads``; else None."""
    if not adapt or device.type != "cpu" or threads <= 1:
        return None
    return ThreadGovernor(threads)
