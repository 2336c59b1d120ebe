"""What one optimizer step reports: TensorBoard scalars through the run monitor, a ``moas.performance`` log
line (step and data time, images/s, memory), and the progress bar's postfix. Split from
``moas.train.loop`` to keep it near 500 lines; ``Trainer._optimizer_step`` calls :func:`report_step`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moas.train.loop import Trainer

perf_log = logging.getLogger("moas.performance")


def report_step(
    t: Trainer, grad_norm: float, step_time: float, data_time: float, domain_logs: dict[str, Any], bar
) -> None:
    """Rank 0 logs the step just taken (``t.global_step``); every rank updates its progress bar."""
    opt = t.opt
    lr = opt.param_groups[0]["lr"]
    if t.monitor is not None:
        t.monitor.set_status(epoch=t.epoch + 1)
        t.monitor.log_step(
            t.global_step,
            losses={"total": t.last_loss, **t.loss_terms},
            lrs={g.get("name", str(k)): g["lr"] for k, g in enumerate(opt.param_groups)},
            lr=lr,
            images_per_sec=t.ips,
            step_time=step_time,
            data_time=data_time,
            grad_norm=grad_norm,
            **domain_logs,
        )
        perf_log.info(
            "step=%d epoch=%d batch=%d micro=%d accum=%d step_s=%.4f data_s=%.4f img_s=%.2f %s",
            t.global_step,
            t.epoch + 1,
            t.batch_pos,
            t.micro_batch,
            t.grad_accum,
            step_time,
            data_time,
            t.ips,
            t.resources.brief(),
        )
    bar.set_postfix(loss=f"{t.last_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{t.ips:.1f}")
