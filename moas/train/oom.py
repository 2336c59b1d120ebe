"""Out-of-memory recovery: recognise an OOM, and pick a smaller micro-batch that keeps the effective batch.

The original lowered the batch and recomputed gradient accumulation (2/3/4) so that optimisation saw the
same number of images per step. In general: the new micro-batch is the largest divisor of the effective
batch (micro × accumulation) below the current micro-batch, and accumulation is effective ÷ micro; so
32×1 → 16×2 → 8×4 → 4×8 … and 6×2 → 4×3 → 3×4 → 2×6. Below ``min_batch`` training stops with a clear
message (after the emergency checkpoint is written). The training loop does the recovery (see
``Trainer._recover_from_oom``); this module holds its pieces.

The side networks' steps (discriminator, enhancer) run after the generator's step has been applied, so they
cannot go back to the last boundary: ``retry_in_chunks`` redoes such a step on the same batch cut into
twice as many pieces, with gradients accumulated over them, until it fits or the pieces are single images.

Memory is only given back once nothing refers to the failed pass: an exception's traceback holds the frames
of the pass and so its activations. Recovery therefore keeps the error's first line, not the error, and
frees memory outside the ``except`` block.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

error_log = logging.getLogger("moas.errors")
T = TypeVar("T")


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors (the typed one, or a RuntimeError saying so)."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def shrink_micro_batch(micro: int, accum: int, min_batch: int = 1) -> tuple[int, int] | None:
    """The next (micro-batch, accumulation) with the same product and a smaller micro-batch, or None."""
    effective = micro * accum
    for m in range(micro - 1, min_batch - 1, -1):
        if m >= 1 and effective % m == 0:
            return m, effective // m
    return None


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
