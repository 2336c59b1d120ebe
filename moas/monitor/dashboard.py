"""``print_progress_dashboard``: the live console dashboard of a training run.

Under a terminal it redraws a few status lines in place below the tqdm progress bar — each line is a
tqdm status bar (``bar_format="{desc}"`` at a fixed position), so tqdm owns the cursor and the two never
fight. When the output is not a terminal (a log file, a pipe) it prints plain lines instead, at most
every ``interval_s`` seconds and whenever forced (epoch ends, checkpoints), with no control codes.

It shows epoch, step, the loss terms, learning rate, throughput, ETA, RAM/VRAM and the best
model-quality score so far, all read from the run's ``TrainingHistory`` (see ``moas.monitor.progress``).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm.auto import tqdm

from moas.monitor.progress import TrainingHistory, history_of

N_LINES = 4


def _fmt_time(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _g(v: float | None, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def eta_seconds(history: TrainingHistory) -> float | None:
    """Time left, from this session's average time per step."""
    st = history.status
    step, total = st.get("step", 0), st.get("total_steps")
    done = step - st.get("session_start_step", 0)
    if not total or done <= 0:
        return None
    return (time.time() - st.get("session_started", st["started"])) / done * max(total - step, 0)


def render_dashboard(history: TrainingHistory) -> list[str]:
    """The dashboard as plain text lines (no control codes)."""
    st = history.status
    h = history
    terms = [n for n in h.names() if n.startswith("loss/") and n != "loss/total"]
    loss = f"loss {_g(h.latest('loss/total'))}"
    if terms:
        loss += " (" + ", ".join(f"{n[5:]} {_g(h.latest(n))}" for n in terms) + ")"
    lr_names = [n for n in h.names() if n.startswith("lr/")] or ["lr"]  # per group when known
    lrs = ", ".join(f"{_g(h.latest(n), '.2e')}" for n in lr_names) or "-"
    best = st.get("best_score")
    best_txt = (
        f"best {st.get('best_metric')} {best:.4f} @ epoch {st.get('best_epoch')}"
        if best is not None
        else "best -"
    )
    vram = h.latest("system/vram_gb")
    return [
        f"epoch {st.get('epoch', 0)}/{st.get('epochs', '?')} | step {st.get('step', 0)}/{st.get('total_steps') or '?'}"
        f" | elapsed {_fmt_time(time.time() - st['started'])} | ETA {_fmt_time(eta_seconds(history))}",
        f"{loss} | lr {lrs} | grad norm {_g(h.latest('train/grad_norm'), '.3g')}",
        f"{_g(h.latest('perf/images_per_sec'), '.1f')} img/s | step {_g(h.latest('perf/step_time_s'), '.3f')} s"
        f" | data wait {_g(h.latest('perf/data_wait_s'), '.3f')} s | RAM {_g(h.latest('system/ram_gb'), '.2f')} GB"
        + (f" | VRAM {vram:.2f} GB" if vram is not None else ""),
        f"{best_txt} | val PSNR {_g(h.latest('val/psnr'), '.2f')} SSIM {_g(h.latest('val/ssim'), '.3f')}"
        f" acc {_g(h.latest('val/accuracy'), '.3f')}",
    ]


class Dashboard:
    """Draws ``render_dashboard`` in place (terminal) or as periodic plain lines (file/pipe)."""

    def __init__(self, file: IO[str] | None = None, interval_s: float = 30.0, enabled: bool = True) -> None:
        self.file = file or sys.stderr
        self.enabled = enabled
        self.interval_s = interval_s
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self._bars: list[tqdm] = []
        self._last = 0.0

    def show(self, history: TrainingHistory, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if not force and now - self._last < 0.5:  # redraw at most twice a second
                return
            self._last = now
            if not self._bars:
                self._bars = [
                    tqdm(total=0, position=i + 1, bar_format="{desc}", file=self.file, leave=True)
                    for i in range(N_LINES)
                ]
            for bar, line in zip(self._bars, render_dashboard(history), strict=True):
                bar.set_description_str(line, refresh=True)
            return
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        self.file.write("".join(f"[dashboard] {line}\n" for line in render_dashboard(history)))
        self.file.flush()

    def close(self) -> None:
        for bar in self._bars:
            bar.close()
        self._bars = []


def print_progress_dashboard(ai_system: Any, file: IO[str] | None = None) -> None:
    """Show the live dashboard of ``ai_system`` now (the object's own dashboard when it has one)."""
    dash = getattr(ai_system, "dashboard", None)
    if isinstance(dash, Dashboard) and dash.enabled and (file is None or dash.file is file):
        dash.show(history_of(ai_system), force=True)
        return
    once = Dashboard(file)
    once.show(history_of(ai_system), force=True)
    once.close()  # the lines stay on screen (leave=True)
