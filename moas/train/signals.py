"""Graceful stop on SIGINT/SIGTERM: the handler only sets a flag; the loop saves at the next step boundary.

Because the handler never raises, a second (or third) signal that arrives while the checkpoint is being
written cannot interrupt the write: it is logged and the save completes. The process then exits with the
shell convention 128 + signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from moas.errors import MoasError

log = logging.getLogger(__name__)


class TrainingInterrupted(MoasError):
    """Training stopped on a signal after saving a checkpoint; the exit code is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class GracefulStop:
    """Context manager: install flag-setting SIGINT/SIGTERM handlers, restore the previous ones on exit.

    Outside the main thread (where Python cannot install handlers) it does nothing and never fires.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum
            log.warning(
                "%s received: saving a checkpoint at the next step boundary, then stopping.",
                signal.Signals(signum).name,
            )
        else:
            log.warning(
                "%s received again: still finishing the save; please wait.", signal.Signals(signum).name
            )

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous.clear()
