"""What can go wrong in a run, and how it is survived: out of memory, a stop signal, and the injected faults
that test both.

**Out of memory.** The original lowered the batch and recomputed gradient accumulation (2/3/4) so that
optimisation saw the same number of images per step. In general: the new micro-batch is the largest divisor
of the effective batch (micro × accumulation) below the current micro-batch, and accumulation is
effective ÷ micro; so 32×1 → 16×2 → 8×4 → 4×8 … and 6×2 → 4×3 → 3×4 → 2×6. Below ``min_batch`` training
stops with a clear message (after the emergency checkpoint is written). The training loop does the
recovery (``Trainer._recover_from_oom``). The side networks' steps run after the generator's step has been
applied, so they cannot go back to the last boundary: ``retry_in_chunks`` redoes such a step on the same
batch cut into twice as many pieces, with gradients accumulated over them, until it fits or the pieces are
single images. Memory is only given back once nothing refers to the failed pass: an exception's traceback
holds the frames of the pass and so its activations. Recovery therefore keeps the error's first line, not
the error, and frees memory outside the ``except`` block.

**Signals.** SIGINT/SIGTERM only set a flag; the loop saves at the next step boundary. Because the handler
never raises, a second (or third) signal that arrives while the checkpoint is being written cannot
interrupt the write: it is logged and the save completes. The process then exits with the shell convention
128 + signal number (130 for SIGINT, 143 for SIGTERM).

**Fault injection** for the fault-tolerance tests: ``MOAS_INJECT="oom@3,nan_loss@5,inf_grad@7,crash@9"``.
Each entry fires once, on the micro-batch whose 1-based count (over this process's run) is given: ``oom``
raises ``torch.OutOfMemoryError`` before the forward pass, ``nan_loss`` replaces the loss with NaN,
``inf_grad`` writes +inf into one gradient after the backward pass, ``crash`` raises RuntimeError, and
``slow_save`` makes every checkpoint save sleep this many tenths of a second (to hit it with a signal).
``MOAS_INJECT_SAVE_DELAY=S`` holds every atomic write (``moas.io``) open for S seconds with its temp file
complete but not yet renamed — the window a kill -9 "during a save" hits. ``FaultInjector`` is the one seam
for all of them: the training run builds one and asks it. Unset (the normal case) it costs one dictionary
lookup per batch.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

import torch

from moas import io
from moas.errors import ConfigError, MoasError

log = logging.getLogger(__name__)
error_log = logging.getLogger("moas.errors")
T = TypeVar("T")


# --- out of memory --------------------------------------------------------------------------------


# What the CUDA libraries say when their own allocation fails (cuBLAS handles and workspaces, cuDNN
# workspaces, cuFFT plans): memory ran out as surely as in torch's allocator.
_LIBRARY_OOM = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUFFT_ALLOC_FAILED")


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors: the typed one, a RuntimeError saying so, or a CUDA library's
    allocation failure."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return "out of memory" in text.lower() or any(code in text for code in _LIBRARY_OOM)


def shrink_micro_batch(micro: int, accum: int, min_batch: int = 1) -> tuple[int, int] | None:
    """The next (micro-batch, accumulation) with the same product and a smaller micro-batch, or None."""
    effective = micro * accum
    for m in range(micro - 1, min_batch - 1, -1):
        if m >= 1 and effective % m == 0:
            return m, effective // m
    return None


def recovery_split(
    micro: int, accum: int, min_batch: int, where: str, message: str, saved
) -> tuple[int, int]:
    """After an out-of-memory error ``where`` (epoch, batch, step) and the emergency checkpoint ``saved``:
    the smaller split of the same effective batch, logged; a MoasError when there is none."""
    shrunk = shrink_micro_batch(micro, accum, min_batch)
    error_log.error(
        "Out of memory at %s (micro-batch %d × %d): %s; emergency checkpoint %s; %s.",
        where,
        micro,
        accum,
        message,
        saved,
        f"recovering with micro-batch {shrunk[0]} × {shrunk[1]}" if shrunk else "cannot recover",
    )
    if shrunk is None:
        raise MoasError(
            f"Out of memory even at micro-batch {micro} (the minimum is {min_batch}); emergency checkpoint "
            f"{saved} was saved. Lower data.resolution or the model size, then resume."
        )
    log.warning(
        "Recovered from out of memory: micro-batch %d × accumulation %d (effective batch kept).", *shrunk
    )
    return shrunk


MIN_EFFICIENT_MICRO_BATCH = 4  # below this a GPU step is launch-bound (the memory plan uses it too)


def checkpointing_first(
    micro: int, accum: int, min_batch: int, device_type: str, checkpointing: bool
) -> bool:
    """After an out-of-memory error on a GPU: turn gradient checkpointing on instead of shrinking the
    micro-batch, when shrinking would go below the efficient minimum and checkpointing is still off."""
    shrunk = shrink_micro_batch(micro, accum, min_batch)
    small = shrunk is None or shrunk[0] < MIN_EFFICIENT_MICRO_BATCH
    return device_type == "cuda" and not checkpointing and small


def free_memory(device: torch.device) -> None:
    """The original's aggressive cleanup: two collections, then give cached CUDA blocks back."""
    gc.collect()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)


def first_line(exc: BaseException | None) -> str:
    """The error's first line (CUDA's out-of-memory message runs to a paragraph)."""
    text = str(exc) if exc is not None else ""
    return text.splitlines()[0] if text else type(exc).__name__


def retry_in_chunks(
    step: Callable[[int], T], chunks: int, most: int, device: torch.device, what: str
) -> tuple[T, int]:
    """``step(chunks)``; after an out-of-memory error, memory is freed and the step is redone with twice the
    chunks, up to ``most`` (one image each). Returns the result and the chunk count that fitted (keep it
    for the next steps). ``step`` must start from zeroed gradients. The error escapes at ``most``."""
    while True:
        try:
            return step(chunks), chunks
        except Exception as exc:
            if not is_oom(exc) or chunks >= most:
                raise
            message = first_line(exc)
        free_memory(device)  # outside the except block: the failed pass's frames are gone
        chunks = min(most, 2 * chunks)
        error_log.error("Out of memory in the %s step (%s); redoing it in %d chunks.", what, message, chunks)


# --- signals --------------------------------------------------------------------------------------


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


# --- fault injection ------------------------------------------------------------------------------
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
