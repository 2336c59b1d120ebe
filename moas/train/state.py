"""TrainState: where a training run is. Checkpointing, out-of-memory recovery and resume take and return it.

The position is (epoch, micro-batch index inside the epoch, optimizer steps so far) plus the run's own
random stream ``gen`` (everything random in a step is drawn from it; see ``moas.train.inputs.StepDraws``). The batch
plan is a pure function of (seed, epoch), so nothing else about the data order is needed. Checkpoints
are only taken at optimizer-step boundaries: ``boundary`` is the position and generator state after the
last completed step, and it is what every checkpoint records — also the emergency ones written in the
middle of a step — so every checkpoint continues bit-identically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Boundary:
    """The position after the last completed optimizer step."""

    epoch: int
    batch_pos: int
    gen_state: torch.Tensor


@dataclass
class MicroResult:
    """What one micro-batch's forward and backward hand on: to the optimizer step (``ok``, ``loss``), the
    side networks' steps (the images and the detached predicted x0) and the step's report."""

    # On the device, read on the host once per optimizer step with the finite check (TrainedNet.apply):
    terms: dict[str, torch.Tensor]  # the loss terms for TensorBoard (diffusion, aux), 0-dim, detached
    logs: dict[str, float]  # the domain and temporal losses' scalars
    x0: torch.Tensor  # (B, 3, H, W) the images
    x0_pred: torch.Tensor | None  # (B, 3, H, W) the predicted x0, detached; None when nothing used it
    ok: torch.Tensor | None = None  # 0-dim bool: the loss was finite (else the step is skipped)
    loss: torch.Tensor | None = None  # 0-dim: the loss that was backpropagated, detached


@dataclass
class TrainState:
    epoch: int = 0
    batch_pos: int = 0  # micro-batches of this epoch already trained
    global_step: int = 0  # optimizer steps taken
    micro_batch: int = 1
    grad_accum: int = 1
    skipped_steps: int = 0  # optimizer steps dropped by the NaN/Inf guard
    train_seconds_before: float = 0.0  # wall time of earlier sessions of this run
    gen: torch.Generator = field(default_factory=torch.Generator)
    boundary: Boundary | None = None
    session_start: float = field(default_factory=time.perf_counter)

    @property
    def micro_in_step(self) -> int:
        """This micro-batch's place in its optimizer step (0 for the first)."""
        return self.batch_pos % self.grad_accum

    def mark_boundary(self) -> None:
        self.boundary = Boundary(self.epoch, self.batch_pos, self.gen.get_state())

    def train_seconds(self) -> float:
        """Wall time spent in the training loop, summed over resumed sessions."""
        return self.train_seconds_before + time.perf_counter() - self.session_start

    def position(self) -> dict[str, Any]:
        """The checkpoint's record of the last boundary (``kind``-independent keys)."""
        b = self.boundary
        return {
            "epoch": b.epoch,
            "batch_in_epoch": b.batch_pos,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
        }

    def at_boundary(self, micro_batch: int | None = None, grad_accum: int | None = None) -> TrainState:
        """This state moved back to its last boundary (the generator too), optionally with another split of
        the effective batch: the position is converted through the images of the epoch already learned."""
        b = self.boundary
        micro = micro_batch or self.micro_batch
        consumed = b.batch_pos * self.micro_batch  # images of this epoch already learned from (per rank)
        gen = torch.Generator()
        gen.set_state(b.gen_state)
        new = replace(
            self,
            epoch=b.epoch,
            batch_pos=consumed // micro,
            micro_batch=micro,
            grad_accum=grad_accum or self.grad_accum,
            gen=gen,
        )
        new.mark_boundary()
        return new


@dataclass
class TrainResult:
    """What a finished run reports: its folders and files, where it ended, its last speed."""

    run_dir: Path
    model_path: Path
    epochs_done: int
    global_step: int
    final_loss: float
    images_per_sec: float
    skipped_steps: int = 0
    micro_batch: int = 0
    grad_accum: int = 0
    last_model_path: Path | None = None  # the final weights; model_path is the best-scoring checkpoint
