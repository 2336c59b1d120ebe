"""A trained network and everything its training needs: the engine of the generator, the discriminator, the
enhancer and the super-resolution stage.

* **Optimizer**: AdamW built the fastest way the installed torch allows (torch's fused kernel, about 3×
  faster per step than the per-tensor loop on the CPU, the same update up to rounding; the default
  implementation where it is not supported). A saved optimizer state keeps this machine's implementation
  flags when it is loaded, so a checkpoint written with either one resumes here.
* **Mixed precision**: autocast (bf16 or fp16, ``moas.device.autocast_dtype``) wraps only the forward
  passes; losses are computed in float32. Under fp16 every backward goes through a GradScaler, one per
  network, because their gradients live on different scales: an overflow in one lowers only its own loss
  scale and skips only its own step. Under bf16 and fp32 the scalers are disabled and pass losses,
  gradients and steps through unchanged. A scaler lives on the run's device (``GradScaler("cpu")`` runs
  the fp16 path, overflow handling included, without a GPU).
* **EMA** of the weights, used for generation.
* :class:`TrainedNet` holds a module, its optimizer, its GradScaler, optionally an EMA copy and its own
  random stream, and does what every network's training shares: **the guarded step**
  (:meth:`TrainedNet.apply`: average the gradients over ranks for networks trained outside DDP, unscale,
  clip, then step — optimizer, scaler, EMA — or, when the loss or the gradient norm was not finite on any
  rank, skip: no optimizer or EMA update, the fp16 scale lowered, the skip counted and logged), **its
  checkpoint state** under the key names its checkpoints have always used (:class:`StateKeys`, so every
  earlier checkpoint still loads), and **out-of-memory retry** (:meth:`TrainedNet.chunked` runs a backward
  in as many pieces as last fitted and doubles them after an out-of-memory error; the count is kept in the
  state, so a resumed run starts with what fitted).
* **Deferred reads** (``deferred = True``): the guard decides on the device instead — the fused AdamW kernel
  takes the "not finite" flag as its ``found_inf`` and leaves weights and moments alone, and the EMA
  update is weighted by the flag — so a step costs no host read; the flags wait in ``pending`` until the
  trainer reads them (``settle``) with the step's values, once per ``train.read_every`` steps. A skipped
  step still counts in ``steps`` (it was attempted; its update was not made).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn

from moas.train.distributed import all_ranks_agree, all_ranks_agree_on_device, average_gradients
from moas.train.faults import first_line, free_memory, is_oom, retry_in_chunks

log = logging.getLogger(__name__)
error_log = logging.getLogger("moas.errors")
T = TypeVar("T")
AutocastFactory = Callable[[], AbstractContextManager]
_IMPL_KEYS = ("fused", "foreach")


# --- optimizer --------------------------------------------------------------------------------------
def adamw(params: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.AdamW:
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # this torch has no fused kernel for these devices/dtypes
        return torch.optim.AdamW(params, **kwargs)


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``opt.load_state_dict(state)`` keeping ``opt``'s own fused/foreach choice (the saved groups carry the
    writer's, which this machine may not support)."""
    impl = [{k: g.get(k) for k in _IMPL_KEYS if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    # Checkpoints load memory-mapped, and on the CPU the optimizer would keep the mapped tensors: the file's
    # disk blocks would stay taken after rotation deletes it. The moments get their own memory.
    for per_param in opt.state.values():
        for key, value in per_param.items():
            if torch.is_tensor(value) and value.device.type == "cpu":
                per_param[key] = value.clone()
    for group, own in zip(opt.param_groups, impl, strict=True):
        group.update(own)


def discriminator_optimizer(
    disc: torch.nn.Module, generator_lr: float, weight_decay: float = 1e-5
) -> torch.optim.AdamW:
    """The original's discriminator optimizer: AdamW at half the generator LR, betas (0.5, 0.999), AMSGrad."""
    return adamw(
        disc.parameters(), lr=generator_lr / 2, betas=(0.5, 0.999), weight_decay=weight_decay, amsgrad=True
    )


def per_tensor(opt: torch.optim.Optimizer) -> None:
    """Switch ``opt`` to its per-tensor implementation: slower, but no temporaries the size of all the
    weights (the list implementation's), and no fused kernel state."""
    for group in opt.param_groups:
        group.update({k: False for k in _IMPL_KEYS if k in group})
    if getattr(opt, "_step_supports_amp_scaling", False):
        opt._step_supports_amp_scaling = False
    for attr in ("grad_scale", "found_inf"):  # a failed fused step leaves the scaler's arguments behind
        if hasattr(opt, attr):
            delattr(opt, attr)


def undo_unfinished_init(opt: torch.optim.Optimizer, known: int) -> bool:
    """After an out-of-memory error in ``opt.step()``: True when nothing was updated yet — it failed while
    it made the moments of parameters at their first step (``known`` states existed before), which every
    implementation does for all parameters before it changes any — and the half-made states are dropped
    so the step can be redone. False when the update had begun: redoing it would move some weights twice."""
    new = list(opt.state)[known:]
    if not new or any(float(opt.state[p].get("step", 0)) > 0 for p in new):
        return False
    for p in new:
        del opt.state[p]
    return True


# --- mixed precision --------------------------------------------------------------------------------
def autocast_factory(device: torch.device, dtype: torch.dtype | None) -> AutocastFactory | None:
    """A factory of autocast contexts for ``device`` in ``dtype``; None for fp32."""
    if dtype is None:
        return None
    return partial(torch.autocast, device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler on ``device``, enabled only for fp16 (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any] | None) -> None:
    """Restore a saved scaler state. A checkpoint of an fp32/bf16 run (an empty state) or of an older
    release (no state) leaves a fresh scaler: its scale calibrates itself within a few steps."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


# --- EMA --------------------------------------------------------------------------------------------
class EMA:
    """A copied module updated as θ_ema ← d·θ_ema + (1 − d)·θ, with d = min(decay, (1 + n) / (10 + n)).

    The warm-up term keeps the average from lagging far behind during short runs. The update is one
    ``torch._foreach_lerp_`` per (device, dtype) group instead of a Python loop over ~1,200 tensors (one
    kernel launch per group on CUDA); on the CPU it gives the same bits as the loop (``tests/test_speed_switches.py``).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.num_updates = 0
        self._groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._buffers: list[tuple[nn.Module, nn.Module, str]] = []
        self._grouped: int | None = None  # id() of the module ``_groups`` was built from

    def _pairs(self, model: nn.Module) -> dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """The (EMA, model) parameter lists per (device, dtype), built once per trained module: walking the
        module tree and sorting ~1,200 tensors into groups every step cost half a bare loop's EMA update
        again on the CPU. The lists hold the Parameters themselves (read under no_grad), so a parameter's
        ``.data`` moved to another device or replaced is still the one read."""
        if self._grouped != id(model):
            groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
                ema_list, model_list = groups.setdefault((e.device, e.dtype), ([], []))
                ema_list.append(e)
                model_list.append(p)
            # Buffers by owner and name, not as tensors: a module may reassign a buffer between steps.
            self._buffers = [
                (e_mod, m_mod, name)
                for (_, e_mod), (_, m_mod) in zip(
                    self.model.named_modules(), model.named_modules(), strict=True
                )
                for name in m_mod._buffers
                if m_mod._buffers[name] is not None
            ]
            self._groups, self._grouped = groups, id(model)
        return self._groups

    @torch.no_grad()
    def update(self, model: nn.Module, keep: torch.Tensor | None = None) -> None:
        """One EMA step toward ``model``; with ``keep`` (a 0-dim bool on the device) a step that is made only
        where it is true: the weight is (1 − d)·keep, so a skipped optimizer step leaves the average as it
        was without the host reading the flag."""
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for (device, dtype), (ema_list, model_list) in self._pairs(model).items():
            w = 1.0 - d if keep is None else keep.to(device, dtype) * (1.0 - d)
            try:
                torch._foreach_lerp_(ema_list, model_list, w)
                continue
            except Exception as exc:
                if not is_oom(exc):
                    raise
                message = first_line(exc)
            # The list update allocates nothing the size of the weights, so it failed before it changed one;
            # tensor by tensor it needs no more memory than each tensor's own.
            free_memory(ema_list[0].device)
            error_log.error("Out of memory in the EMA update (%s); redone tensor by tensor.", message)
            for e, p in zip(ema_list, model_list, strict=True):
                e.lerp_(p, w)
        for e_mod, m_mod, name in self._buffers:
            getattr(e_mod, name).copy_(getattr(m_mod, name))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


# --- the engine -------------------------------------------------------------------------------------
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


def wide_float(device: torch.device) -> torch.dtype:
    """float64 for sums and reads that must match the host's arithmetic; float32 on Apple GPUs (no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def host_read(
    loss_ok: bool | torch.Tensor, norm: torch.Tensor, report: Sequence[torch.Tensor] = ()
) -> tuple[bool, list[float]]:
    """The guarded step's one read on the host (a device sync on CUDA): whether the loss (``loss_ok``, a
    flag on the device or a bool) and the gradient norm were finite, and the values the step reports — the
    norm first, then ``report`` — in one transfer instead of one per value."""
    finite = torch.isfinite(norm)
    if torch.is_tensor(loss_ok):
        finite = finite & loss_ok.to(finite.device)
    elif not loss_ok:
        finite = torch.zeros_like(finite)
    dtype = wide_float(norm.device)
    values = [
        finite.to(dtype),
        norm.to(dtype),
        *(t.detach().reshape(()).to(norm.device, dtype) for t in report),
    ]
    read = torch.stack(values).tolist()
    return read[0] > 0.5, read[1:]


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
        self.in_a_row = 0  # skipped since the last step taken (a network stuck there will not recover)
        self.chunks = 1  # pieces a batch is cut into (more after an out-of-memory error)
        self.read: list = []  # the last step's norm and reported values as read (deferred: the norm, unread)
        self._params: list[nn.Parameter] | None = None
        self.deferred = False  # the guard decides on the device; see the module docstring
        self.pending: list[torch.Tensor] = []  # deferred: each step's finite flag (0-dim bool), unread

    def parameters(self) -> list[nn.Parameter]:
        """The module's parameters, listed once: every network creates all of its parameters when it is
        built, and walking the module tree twice a step cost ~1 ms on the CPU."""
        if self._params is None:
            self._params = list(self.module.parameters())
        return self._params

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def chunked(self, backward: Callable[[int], T], batch_size: int, device: torch.device) -> T:
        """``backward(chunks)`` (which starts from zeroed gradients), redone in more pieces after an
        out-of-memory error; the count that fitted is kept for the next steps."""
        result, self.chunks = retry_in_chunks(backward, self.chunks, batch_size, device, self.name)
        return result

    def apply(
        self, loss_ok: bool | torch.Tensor = True, report: Sequence[torch.Tensor] = ()
    ) -> torch.Tensor | None:
        """The guarded optimizer step over the accumulated gradients; the gradient norm before clipping, or
        None when the step was skipped (a non-finite loss here, or a non-finite norm, on any rank).
        ``report``: 0-dim tensors read on the host with the finite check (``host_read``), so the step
        costs one sync; ``self.read`` holds the norm and their values afterwards, skipped or not."""
        params = self.parameters()
        if self.average:
            average_gradients(params)  # collective: every rank calls it, also before a skip
        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if self.deferred:
            self._apply_on_device(loss_ok, norm)
            return norm
        ok, self.read = host_read(loss_ok, norm, report)
        if not all_ranks_agree(ok):
            if self.scaler.is_enabled():
                self.scaler.update()  # lowers the fp16 loss scale
            self.opt.zero_grad(set_to_none=True)
            self._count(False)
            return None
        self._optimizer_step()
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.module)
        self.steps += 1
        self._count(True)
        return norm

    def apply_reporting(
        self, loss_ok: bool | torch.Tensor, scalars: dict[str, torch.Tensor]
    ) -> dict[str, float] | None:
        """``apply`` with the step's TensorBoard ``scalars`` (0-dim tensors) read in the guard's one transfer:
        their values, or None when the step was skipped. Deferred: the scalars themselves, unread (the
        trainer reads them with the flags; a skipped step's non-finite values are not logged)."""
        if self.apply(loss_ok, list(scalars.values())) is None:
            return None
        if self.deferred:
            return dict(scalars)
        return dict(zip(scalars, self.read[1:], strict=True))

    def _apply_on_device(self, loss_ok: bool | torch.Tensor, norm: torch.Tensor) -> None:
        """The guarded step decided on the device (``deferred``): the fused optimizer skips its own update
        when the flag says "not finite" (under fp16 the GradScaler hands it its overflow flag instead), the
        EMA update is weighted by the flag, and the flag joins ``pending``."""
        finite = torch.isfinite(norm)
        if torch.is_tensor(loss_ok):
            finite = finite & loss_ok.to(finite.device)
        elif not loss_ok:
            finite = torch.zeros_like(finite)
        finite = all_ranks_agree_on_device(finite)
        self._optimizer_step(skip=None if self.scaler.is_enabled() else ~finite)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.module, keep=finite)
        self.steps += 1
        self.pending.append(finite)
        self.read = [norm]  # unread: the trainer reads it with the flags

    def settle(self, flags: Sequence[bool]) -> None:
        """Account for the pending steps' flags as read by the trainer (in order)."""
        self.pending.clear()
        for ok in flags:
            self._count(ok)

    def _count(self, ok: bool) -> None:
        """A step taken (the run of skips ends) or skipped (counted and logged)."""
        if ok:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        log.warning("Skipped a %s step (non-finite loss or gradient; %d so far).", self.name, self.skipped)

    def _optimizer_step(self, skip: torch.Tensor | None = None) -> None:
        """The optimizer's step through the scaler; with ``skip`` (a 0-dim bool on the device) the fused
        kernel makes no update where it is true. The moments are made at a parameter's first step; an
        out-of-memory error then (before any weight changed) is redone once, with memory freed and the
        per-tensor implementation (which takes no device flag: that step's flag is read, and the guard
        reads on the host from then on). An error after the update began escapes: the run ends with an
        emergency checkpoint."""
        known = len(self.opt.state)
        if skip is not None:
            self.opt.found_inf, self.opt.grad_scale = skip.to(torch.float32), None
        try:
            self.scaler.step(self.opt)
            return
        except Exception as exc:
            if not is_oom(exc) or not undo_unfinished_init(self.opt, known):
                raise
            message = first_line(exc)
        finally:
            if skip is not None:
                self.opt.found_inf = None
        free_memory(self.parameters()[0].device)
        per_tensor(self.opt)
        error_log.error(
            "Out of memory while the %s's optimizer made its moments (%s); redone with per-tensor updates.",
            self.name,
            message,
        )
        if self.deferred:
            self.deferred = False
            log.info(
                "The %s's guard reads its flags on the host from now on (per-tensor updates).", self.name
            )
        if skip is None or not bool(skip):
            self.scaler.step(self.opt)

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
