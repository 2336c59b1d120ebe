"""Where a run's wall time went: named phases timed by a clock whose phases nest without double counting.

A phase entered inside another pauses the outer one, so the seconds of all phases add up to the time spent
inside any of them; what no phase covers is "other". ``moas train`` logs the table at the end of a run and
writes it to ``<run>/timings.json``; ``moas demo`` prints one for the whole demo.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moas.io import atomic_write_bytes

log = logging.getLogger(__name__)

TIMINGS_FILE = "timings.json"


class PhaseClock:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._stack: list[tuple[str, float]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:  # pause the enclosing phase
            outer, since = self._stack[-1]
            self._add(outer, now - since)
        self._stack.append((name, now))
        try:
            yield
        finally:
            _, since = self._stack.pop()
            now = time.perf_counter()
            self._add(name, now - since)
            if self._stack:  # resume the enclosing phase from now
                self._stack[-1] = (self._stack[-1][0], now)

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def table(self) -> tuple[dict[str, float], float]:
        """(seconds per phase, with "other" for the rest of the wall time since the clock started; the total)."""
        total = time.perf_counter() - self.started
        phases = {k: round(v, 2) for k, v in self.seconds.items()}
        phases["other"] = round(max(0.0, total - sum(self.seconds.values())), 2)
        return phases, round(total, 2)


def phase_table(seconds: dict[str, float], total: float | None = None, title: str = "phase") -> str:
    """A plain-text table of ``seconds`` (in the given order) with each phase's share of ``total`` (default:
    their sum), and the total."""
    total = sum(seconds.values()) if total is None else total
    width = max([len(title), len("total"), *(len(k) for k in seconds)])
    lines = [f"{title:<{width}}  {'seconds':>8}  {'share':>6}"]
    for name, s in seconds.items():
        lines.append(f"{name:<{width}}  {s:8.1f}  {100 * s / max(total, 1e-9):5.1f}%")
    lines.append(f"{'total':<{width}}  {total:8.1f}  {100.0:5.1f}%")
    return "\n".join(lines)


def save_timings(run_dir: str | Path, clock: PhaseClock) -> dict:
    """Log the run's phase table and write it to ``<run_dir>/timings.json``; returns what was written."""
    phases, total = clock.table()
    log.info("Where the time went:\n%s", phase_table(phases, total))
    record = {"phases": phases, "total": total}
    atomic_write_bytes(Path(run_dir) / TIMINGS_FILE, json.dumps(record, indent=2).encode())
    return record


def load_timings(run_dir: str | Path) -> dict | None:
    """The ``timings.json`` of a finished run, or None."""
    try:
        return json.loads((Path(run_dir) / TIMINGS_FILE).read_text())
    except (OSError, ValueError):
        return None
