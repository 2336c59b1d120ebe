"""One trained network and the machinery every one of them needs: the engine of the generator, the
discriminator, the enhancer and the super-resolution stage.

A :class:`TrainedNet` holds a module, its optimizer, its GradScaler, optionally an EMA copy and its own
random stream, and does the two things each network's training shares:

* **the guarded step** (:meth:`TrainedNet.apply`): average the gradients over ranks (networks trained outside
  DDP), unscale, clip, and then either step — optimizer, scaler, EMA — or, when the loss or the gradient
  norm was not finite on any rank, skip: no optimizer or EMA update, the fp16 scale lowered, the skip
  counted and logged;
* **its checkpoint state** (:meth:`state_dict` / :meth:`load_state_dict`) under the key names the network's
  checkpoints have always used (:class:`StateKeys`), so every earlier checkpoint still loads.

Out-of-memory retry: :meth:`chunked` runs a backward over the batch in as many pieces as last fitted and
doubles them after an out-of-memory error (``moas.train.oom.retry_in_chunks``); the count is kept in the
state so a resumed run starts with what fitted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from moas.train.distributed import all_ranks_agree, average_gradients
from moas.train.ema import EMA
from moas.train.oom import retry_in_chunks
from moas.train.optim import load_optimizer_state
from moas.train.precision import load_scaler_state

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class StateKeys:
    """Where each part of a network sits in its checkpoint dict ('' = not saved)."""

    module: str
    optimizer: str
    scaler: str
    ema: str = ""
    rng: str = ""
    steps: str = ""
    chunks: str = ""
    scaler_always: bool = False  # write the scaler's state even when it is disabled (an empty dict)


class TrainedNet:
    def __init__(
        self,
        name: str,
        module: nn.Module,
        opt: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        keys: StateKeys,
        *,
        max_grad_norm: float,
        ema: EMA | None = None,
        gen: torch.Generator | None = None,
        average: bool = True,  # False for a module wrapped in DDP, which averages its own gradients
    ) -> None:
        self.name, self.module, self.opt, self.scaler, self.keys = name, module, opt, scaler, keys
        self.max_grad_norm, self.ema, self.gen, self.average = max_grad_norm, ema, gen, average
        self.steps = 0  # optimizer steps taken
        self.skipped = 0  # steps skipped by the guard
        self.chunks = 1  # pieces a batch is cut into (more after an out-of-memory error)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def chunked(self, backward: Callable[[int], T], batch_size: int, device: torch.device) -> T:
        """``backward(chunks)`` (which starts from zeroed gradients), redone in more pieces after an
        out-of-memory error; the count that fitted is kept for the next steps."""
        result, self.chunks = retry_in_chunks(backward, self.chunks, batch_size, device, self.name)
        return result

    def apply(self, loss_ok: bool = True) -> torch.Tensor | None:
        """The guarded optimizer step over the accumulated gradients; the gradient norm before clipping, or
        None when the step was skipped (a non-finite loss here, or a non-finite norm, on any rank)."""
        params = self.parameters()
        if self.average:
            average_gradients(params)  # collective: every rank calls it, also before a skip
        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if not all_ranks_agree(loss_ok and bool(torch.isfinite(norm))):
            if self.scaler.is_enabled():
                self.scaler.update()  # lowers the fp16 loss scale
            self.opt.zero_grad(set_to_none=True)
            self.skipped += 1
            log.warning(
                "Skipped a %s step (non-finite loss or gradient; %d so far).", self.name, self.skipped
            )
            return None
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.module)
        self.steps += 1
        return norm

    # --- checkpoint state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        k = self.keys
        state: dict[str, Any] = {k.module: self.module.state_dict(), k.optimizer: self.opt.state_dict()}
        if k.ema and self.ema is not None:
            state[k.ema] = self.ema.state_dict()
        if k.rng and self.gen is not None:
            state[k.rng] = self.gen.get_state()
        if k.steps:
            state[k.steps] = self.steps
        # Only what differs from a fresh start, so the checkpoints of fp32 runs keep their exact contents.
        if k.scaler_always or self.scaler.is_enabled():
            state[k.scaler] = self.scaler.state_dict()
        if k.chunks and self.chunks > 1:
            state[k.chunks] = self.chunks
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint dict; raises KeyError, RuntimeError, ValueError or TypeError when it
        does not fit. Counters and the scaler missing from an older checkpoint start fresh."""
        k = self.keys
        self.module.load_state_dict(state[k.module])
        load_optimizer_state(self.opt, state[k.optimizer])
        if k.ema and self.ema is not None:
            self.ema.load_state_dict(state[k.ema])
        if k.rng and self.gen is not None and k.rng in state:
            self.gen.set_state(state[k.rng])
        if k.steps:
            self.steps = int(state.get(k.steps, 0))
        if k.chunks:
            self.chunks = int(state.get(k.chunks, 1))
        load_scaler_state(self.scaler, state.get(k.scaler))
