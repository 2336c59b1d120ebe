"""A memory plan before the first step: predicted peak accelerator memory, and the micro-batch,
accumulation and gradient checkpointing that fit a budget while keeping the effective batch.

The peak of a training step is the training state (weights, gradients, AdamW/AMSGrad moments, the EMA copy,
the side networks' states, autocast's low-precision weight copies) plus what the forward keeps for the
backward, plus the backward's own working set. The kept activations are *traced*, not guessed: one forward
runs on the meta device (shapes only, no memory, a fraction of a second even at 300 M parameters) under a
saved-tensors hook that adds up every tensor autograd keeps. Attention is traced as the fused kernels run
it on a GPU (query, key, value, output and the log-sum-exp; not the full attention matrix), and the
precision as CUDA autocast keeps it: normalisations in fp32 (their outputs and the SiLU after them kept in
fp32), convolutions, linear layers and matrix products on low-precision copies of their inputs. On top: the
cuBLAS/cuDNN workspaces (``WORKSPACE_BYTES``) and at least 10 % of the budget kept free. The backward's
working set is a measured multiple of the kept activations (``BACKWARD_FACTOR``, calibrated on the CPU
against allocator peaks; ``bench/memory_plan.py`` re-measures it and the predictor's error).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moas.train.faults import MIN_EFFICIENT_MICRO_BATCH

GB = 1024**3
# Peak of a step ≈ state (gradients included) + BACKWARD_FACTOR × traced kept activations: gradients are
# allocated while the backward frees activations, so the two never peak together (bench/memory_plan.py).
BACKWARD_FACTOR = 0.85
# Allocator overhead: fragmentation and the CUDA context, as a share of the budget kept free.
RESERVE_FRACTION = 0.10  # the plan keeps at least this share of the budget free
# cuBLAS and cuDNN workspaces (per-handle matmul workspace, convolution algorithms' scratch), not traced.
WORKSPACE_BYTES = GB // 4


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextmanager
def _fused_attention_shapes():
    """On the meta device, attention without dropout as the fused GPU kernels keep it for the backward."""
    real = F.scaled_dot_product_attention

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            # A shape-only stand-in on the meta device: the plan traces the forward and never backpropagates.
            raise RuntimeError("the memory plan's attention stand-in has no backward; it only traces shapes")

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if q.device.type != "meta" or dropout_p > 0:
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
        return Fused.apply(q, k, v)

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _floats(values, dtype: torch.dtype) -> list:
    return [v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for v in values]


@contextmanager
def _autocast_shapes():
    """On the meta device, what CUDA autocast keeps: normalisations run in float32, so their outputs (and
    the SiLU after them) are kept in fp32; convolutions and linear layers cast their inputs to the weights'
    low precision and keep the cast copy. In fp32 both rules change nothing."""
    real = {name: getattr(F, name) for name in ("group_norm", "layer_norm", "conv2d", "linear")}

    def norm(name: str):
        def run(x, *args, **kwargs):
            if x.device.type != "meta":
                return real[name](x, *args, **kwargs)
            kw = dict(zip(kwargs, _floats(kwargs.values(), torch.float32), strict=True))
            return real[name](x.float(), *_floats(args, torch.float32), **kw)

        return run

    def cast(name: str):
        def run(x, weight, *args, **kwargs):
            if x.device.type != "meta":
                return real[name](x, weight, *args, **kwargs)
            low = weight.dtype
            kw = dict(zip(kwargs, _floats(kwargs.values(), low), strict=True))
            return real[name](x.to(low), weight, *_floats(args, low), **kw)

        return run

    def lowest(fn):  # matrix products: every float operand in the lowest precision among them
        def run(*args, **kwargs):
            tensors = [a for a in args if torch.is_tensor(a) and a.is_floating_point()]
            if not tensors or tensors[0].device.type != "meta":
                return fn(*args, **kwargs)
            low = min((t.dtype for t in tensors), key=lambda d: torch.finfo(d).bits)
            return fn(*_floats(args, low), **kwargs)

        return run

    products = {name: getattr(torch, name) for name in ("einsum", "matmul", "bmm", "baddbmm")}
    for name in ("group_norm", "layer_norm"):
        setattr(F, name, norm(name))
    for name in ("conv2d", "linear"):
        setattr(F, name, cast(name))
    for name, fn in products.items():
        setattr(torch, name, lowest(fn))
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(F, name, fn)
        for name, fn in products.items():
            setattr(torch, name, fn)


def traced_activation_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of every tensor autograd keeps for the backward of ``forward()`` (views counted once, the
    trained weights not at all: they are state)."""
    kept: dict[int, int] = {}
    hold: list[torch.Tensor] = []  # keeps ids unique while tracing

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if not (base.is_leaf and base.requires_grad):
            kept[id(base)] = _tensor_bytes(base)
            hold.append(base)
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with _fused_attention_shapes(), _autocast_shapes(), hooks:
        out = forward()
    del out
    hold.clear()
    return sum(kept.values())


@dataclass
class StateBytes:
    """Training state that lives for the whole run (bytes)."""

    weights: int  # the generator's fp32 weights
    grads: int  # their gradients
    optimizer: int  # AdamW moments (three tensors per weight with AMSGrad)
    ema: int  # the EMA copy
    side: int  # discriminator, enhancer and super-resolution stage: weights, gradients, moments (EMA)
    cast_weights: int = 0  # autocast's low-precision copies of the weights

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.ema + self.side + self.cast_weights


def state_bytes(
    model: torch.nn.Module, side: list[torch.nn.Module], amsgrad: bool, amp_bytes: int | None
) -> StateBytes:
    """The state of ``model`` (+ ``side`` networks, AMSGrad) trained with autocast to ``amp_bytes``-byte
    floats (None: fp32)."""
    params = [p for p in model.parameters() if p.requires_grad]
    w = sum(_tensor_bytes(p) for p in model.parameters())
    g = sum(_tensor_bytes(p) for p in params)
    side_w = sum(_tensor_bytes(p) for m in side for p in m.parameters())
    cast = sum(p.numel() for p in params) * amp_bytes if amp_bytes else 0
    return StateBytes(w, g, (3 if amsgrad else 2) * g, w, side_w * (2 + 3), cast)


@dataclass
class MemoryPlan:
    budget: int
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    enhance_batch: int
    state: StateBytes
    activations: int  # traced kept activations of one micro-batch
    step_peak: int  # the generator step's predicted peak
    enhancer_peak: int  # the enhancer step's predicted peak (0 without an enhancer)
    fits: bool
    notes: list[str] = field(default_factory=list)
    sr_batch: int = 0
    sr_peak: int = 0  # the super-resolution stage's step peak (0 without one)

    @property
    def peak(self) -> int:
        return max(self.step_peak, self.enhancer_peak, self.sr_peak)

    def describe(self) -> str:
        s = self.state
        lines = [
            f"memory plan: predicted peak {self.peak / GB:.2f} GB of the {self.budget / GB:.1f} GB budget"
            + ("" if self.fits else " — DOES NOT FIT"),
            f"  state {s.total / GB:.2f} GB: weights {s.weights / GB:.2f}, gradients {s.grads / GB:.2f}, "
            f"optimizer {s.optimizer / GB:.2f}, EMA {s.ema / GB:.2f}, side networks {s.side / GB:.2f}, "
            f"autocast copies {s.cast_weights / GB:.2f}",
            f"  generator step: micro-batch {self.micro_batch} × accumulation {self.grad_accum}, gradient "
            f"checkpointing {'on' if self.checkpointing else 'off'}: activations "
            f"{self.activations / GB:.2f} GB, peak {self.step_peak / GB:.2f} GB",
        ]
        if self.enhancer_peak:
            lines.append(
                f"  enhancer step: {self.enhance_batch} pairs, peak {self.enhancer_peak / GB:.2f} GB"
            )
        if self.sr_peak:
            lines.append(f"  super-resolution step: {self.sr_batch} crops, peak {self.sr_peak / GB:.2f} GB")
        return "\n".join(lines + [f"  {n}" for n in self.notes])


def _micro_batches(batch_size: int, effective: int, min_batch: int) -> list[int]:
    """Candidate micro-batches, largest first: divisors of the effective batch, up to the whole effective
    batch in one micro-batch (a large card needs less accumulation; the effective batch, and with it the
    learning rate, stays the profile's)."""
    found = [m for m in range(effective, min_batch - 1, -1) if effective % m == 0]
    return found or [max(min_batch, 1)]


def plan_memory(
    budget: int,
    state: StateBytes,
    activations: Callable[[int, bool], int],
    batch_size: int,
    grad_accum: int,
    min_batch: int = 1,
    checkpointing: str | bool = "auto",
    enhancer: Callable[[int], int] | None = None,
    enhance_batch: int = 0,
    sr: Callable[[int], int] | None = None,
    sr_batch: int = 0,
) -> MemoryPlan:
    """The largest micro-batch (a divisor of the effective batch ``batch_size × grad_accum``) whose step fits
    ``budget``, first without gradient checkpointing, then with it (``checkpointing`` "auto"; True/False
    force it); the enhancer's and the super-resolution stage's batches halve until their steps fit.
    ``activations(m, ckpt)``, ``enhancer(b)`` and ``sr(b)`` return traced kept-activation bytes."""
    usable = int(budget * (1 - RESERVE_FRACTION)) - WORKSPACE_BYTES
    effective = batch_size * grad_accum
    modes = [False, True] if checkpointing == "auto" else [bool(checkpointing)]
    options = []  # (micro-batch, checkpointing, activations, peak) of the largest fitting micro-batch per mode
    for ckpt in modes:
        for m in _micro_batches(batch_size, effective, min_batch):
            act = activations(m, ckpt)
            peak = state.total + int(BACKWARD_FACTOR * act)
            if peak <= usable:
                break
        options.append((m, ckpt, act, peak))
    # Recomputing the forward costs about a third more compute; a small micro-batch costs utilisation.
    # Without checkpointing while its micro-batch keeps the GPU busy, else with it.
    plain = options[0]
    fits_plain = plain[3] <= usable and (plain[0] >= MIN_EFFICIENT_MICRO_BATCH or plain[0] == batch_size)
    choice = plain if fits_plain or len(options) == 1 else options[1]
    notes: list[str] = []
    m, ckpt, act, peak = choice
    if m < batch_size:
        notes.append(
            f"micro-batch {batch_size} does not fit; {m} × {effective // m} keeps the effective batch of {effective}"
        )
    elif m > batch_size:
        notes.append(
            f"room for micro-batch {m} × {effective // m} (the profile's {batch_size} × {grad_accum}): the same "
            f"effective batch of {effective} and learning rate, less accumulation"
        )
    enh_peak, eb = _side_fit(state, usable, enhancer, enhance_batch, "enhancer pairs", notes)
    sr_peak, sb = _side_fit(state, usable, sr, sr_batch, "super-resolution crops", notes)
    fits = peak <= usable and enh_peak <= usable and sr_peak <= usable
    if not fits:
        notes.append("even the smallest settings exceed the budget: lower data.resolution or the model size")
    return MemoryPlan(
        budget, m, effective // m, ckpt, eb, state, act, peak, enh_peak, fits, notes, sb, sr_peak
    )


def _side_fit(
    state: StateBytes,
    usable: int,
    activations: Callable[[int], int] | None,
    batch: int,
    what: str,
    notes: list,
) -> tuple[int, int]:
    """(peak, batch) of a side network's step, its batch halved until the step fits (or is 1)."""
    if activations is None or not batch:
        return 0, batch
    b = batch
    while True:
        peak = state.total + int(BACKWARD_FACTOR * activations(b))
        if peak <= usable or b == 1:
            break
        b //= 2
    if b < batch:
        notes.append(f"{what} per step lowered from {batch} to {b} to fit")
    return peak, b
