"""What one optimizer step reports: TensorBoard scalars through the run monitor, a ``moas.performance`` log
line (step and data time, images/s, memory), and the progress bar's postfix."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

perf_log = logging.getLogger("moas.performance")


@dataclass
class StepReport:
    step: int  # optimizer steps so far
    epoch: int  # 1-based
    batch_pos: int  # micro-batches of this epoch done
    micro_batch: int
    grad_accum: int
    loss: float  # mean over the step's micro-batches
    lr: float  # parameter group 0
    images_per_sec: float
    step_time: float  # seconds from the step's first micro-batch to the end of its update
    data_time: float  # seconds spent waiting for the step's batches
    grad_norm: float  # before clipping
    terms: dict[str, float] = field(default_factory=dict)  # loss terms of the last micro-batch
    lrs: dict[str, float] = field(default_factory=dict)  # per parameter group
    scalars: dict[str, Any] = field(default_factory=dict)  # domain, discriminator, enhancer, temporal


def report_step(monitor, report: StepReport, resources_brief: str, bar) -> None:
    """Rank 0 (``monitor`` is not None) logs the step; every rank updates its progress bar."""
    r = report
    if monitor is not None:
        monitor.set_status(epoch=r.epoch)
        monitor.log_step(
            r.step,
            losses={"total": r.loss, **r.terms},
            lrs=r.lrs,
            lr=r.lr,
            images_per_sec=r.images_per_sec,
            step_time=r.step_time,
            data_time=r.data_time,
            grad_norm=r.grad_norm,
            **r.scalars,
        )
        perf_log.info(
            "step=%d epoch=%d batch=%d micro=%d accum=%d step_s=%.4f data_s=%.4f img_s=%.2f %s",
            r.step,
            r.epoch,
            r.batch_pos,
            r.micro_batch,
            r.grad_accum,
            r.step_time,
            r.data_time,
            r.images_per_sec,
            resources_brief,
        )
    bar.set_postfix(loss=f"{r.loss:.4f}", lr=f"{r.lr:.2e}", img_s=f"{r.images_per_sec:.1f}")
