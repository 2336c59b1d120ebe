"""The metrics history of a run and ``visualize_training_progress``, the 3×3 progress chart.

Protocol: ``visualize_training_progress`` and ``print_progress_dashboard`` accept any object ``ai_system``
that has a ``history`` attribute holding a :class:`TrainingHistory` (``RunMonitor`` does), or a
``TrainingHistory`` itself. A history is a set of named scalar series (``series(name)`` → [(step, value)])
plus a ``status`` dict (epoch, epochs, step, total_steps, started, best score, …).
"""

from __future__ import annotations

import io
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

from moas.io import atomic_write_bytes

log = logging.getLogger(__name__)

MAX_POINTS = 20_000  # per series; older points are dropped (a chart needs no more)

# The nine panels: title, the series drawn in it (those present), y-axis scale.
PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Loss", ("loss/total", "val/loss"), "log"),
    ("Per-expert error (x0)", ("expert/line_art", "expert/color", "expert/background"), "linear"),
    (
        "Art-theory error (x0)",
        ("art_theory/anatomy", "art_theory/perspective", "art_theory/color_harmony"),
        "linear",
    ),
    ("Learning rate", ("lr",), "log"),
    ("Gradient norm", ("train/grad_norm",), "linear"),
    ("Throughput (images/s)", ("perf/images_per_sec",), "linear"),
    ("Validation PSNR (dB)", ("val/psnr",), "linear"),
    ("Validation SSIM", ("val/ssim",), "linear"),
    (
        "Accuracy / self-critique / creativity",
        ("val/accuracy", "eval/self_critique", "eval/creativity"),
        "linear",
    ),
)


class TrainingHistory:
    """Named scalar series and the run's status, shared by the dashboard and the progress chart."""

    def __init__(self) -> None:
        self.scalars: dict[str, deque[tuple[int, float]]] = {}
        self.status: dict[str, Any] = {"started": time.time(), "session_start_step": 0}

    def add(self, step: int, name: str, value: float) -> None:
        self.scalars.setdefault(name, deque(maxlen=MAX_POINTS)).append((int(step), float(value)))

    def series(self, name: str) -> list[tuple[int, float]]:
        return list(self.scalars.get(name, ()))

    def latest(self, name: str) -> float | None:
        s = self.scalars.get(name)
        return s[-1][1] if s else None

    def names(self) -> list[str]:
        return sorted(self.scalars)


def history_of(ai_system: Any) -> TrainingHistory:
    """The ``TrainingHistory`` of ``ai_system`` (see the module protocol)."""
    if isinstance(ai_system, TrainingHistory):
        return ai_system
    history = getattr(ai_system, "history", None)
    if not isinstance(history, TrainingHistory):
        raise TypeError("ai_system must be a TrainingHistory or have a .history TrainingHistory attribute")
    return history


def visualize_training_progress(ai_system: Any, save_path: str | Path = "progress.png"):
    """Draw the 3×3 chart of the main metrics to ``save_path`` (atomically); return the figure's axes.

    Panels with no data yet say so instead of staying blank, so the layout is always nine panels.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    history = history_of(ai_system)
    fig = Figure(figsize=(15, 11), dpi=72)
    axes = fig.subplots(3, 3, gridspec_kw={"hspace": 0.35, "wspace": 0.22}).ravel()
    for ax, (title, names, scale) in zip(axes, PANELS, strict=True):
        ax.set_title(title, fontsize=10)
        drawn = False
        for name in names:
            pts = history.series(name)
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=name.split("/", 1)[-1], marker="o" if len(pts) < 30 else None, ms=3)
            drawn = True
        if drawn:
            positive = all(v > 0 for n in names for _, v in history.series(n))
            ax.set_yscale(scale if positive else "linear")
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    st = history.status
    fig.suptitle(
        f"moas training progress — epoch {st.get('epoch', 0)}/{st.get('epochs', '?')}, step {st.get('step', 0)}"
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(save_path), buf.getvalue())
    return list(fig.axes)
