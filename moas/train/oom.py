"""Out-of-memory recovery: recognise an OOM, and pick a smaller micro-batch that keeps the effective batch.

The original lowered the batch and recomputed gradient accumulation (2/3/4) so that optimisation saw the
same number of images per step. In general: the new micro-batch is the largest divisor of the effective
batch (micro × accumulation) below the current micro-batch, and accumulation is effective ÷ micro; so
32×1 → 16×2 → 8×4 → 4×8 … and 6×2 → 4×3 → 3×4 → 2×6. Below ``min_batch`` training stops with a clear
message (after the emergency checkpoint is written).
"""

from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING

import torch

from moas.errors import MoasError

if TYPE_CHECKING:
    from moas.train.loop import Trainer

log = logging.getLogger(__name__)
error_log = logging.getLogger("moas.errors")


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


def recover_from_oom(t: Trainer) -> None:
    """Emergency checkpoint, smaller micro-batch with more accumulation, new DataLoader, same images."""
    exc = t.oom_error
    t.oom_error = None
    t.opt.zero_grad(set_to_none=True)
    free_memory(t.device)
    epoch, batch_pos, gen_state = t.boundary
    path = t.save(f"emergency_oom_epoch_{epoch + 1:04d}.pt", kind="emergency_oom")
    shrunk = shrink_micro_batch(t.micro_batch, t.grad_accum, t.tc.min_batch_size)
    error_log.error(
        "Out of memory at epoch %d, batch %d, step %d (micro-batch %d × %d): %s; emergency checkpoint %s; %s.",
        epoch + 1,
        t.batch_pos,
        t.global_step,
        t.micro_batch,
        t.grad_accum,
        str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        path,
        f"recovering with micro-batch {shrunk[0]} × {shrunk[1]}" if shrunk else "cannot recover",
    )
    if shrunk is None:
        raise MoasError(
            f"Out of memory even at micro-batch {t.micro_batch} (the minimum is {t.tc.min_batch_size}); "
            f"emergency checkpoint {path} was saved. Lower data.resolution or the model size, then resume."
        )
    consumed = batch_pos * t.micro_batch  # images of this epoch already learned from (per rank)
    t.micro_batch, t.grad_accum = shrunk
    t.epoch, t.batch_pos = epoch, consumed // t.micro_batch
    t.gen.set_state(gen_state)
    t._mark_boundary()
    log.warning(
        "Recovered from out of memory: micro-batch %d × accumulation %d (effective batch kept).",
        t.micro_batch,
        t.grad_accum,
    )
