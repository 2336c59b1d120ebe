"""Out-of-memory recovery: recognise an OOM, and pick a smaller micro-batch that keeps the effective batch.

The original lowered the batch and recomputed gradient accumulation (2/3/4) so that optimisation saw the
same number of images per step. In general: the new micro-batch is the largest divisor of the effective
batch (micro × accumulation) below the current micro-batch, and accumulation is effective ÷ micro; so
32×1 → 16×2 → 8×4 → 4×8 … and 6×2 → 4×3 → 3×4 → 2×6. Below ``min_batch`` training stops with a clear
message (after the emergency checkpoint is written). The training loop does the recovery (see
``Trainer._recover_from_oom``); this module holds its pieces.
"""

from __future__ import annotations

import gc

import torch


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
