"""One optimizer step of the generator, top to bottom: the part of :class:`~moas.train.loop.Trainer` that
learns from a batch.

``_micro_step`` is one forward/backward — the step's random draws (``moas.train.inputs.StepDraws``), the
generator's inputs, the diffusion objective, the extra losses, the NaN/Inf guard, backward — and returns
what it computed as a :class:`~moas.train.state.MicroResult`; ``_optimizer_step`` applies the accumulated
step (the generator's :class:`~moas.train.trained_net.TrainedNet` guards it), ``_side_steps`` trains the
discriminator, enhancer and super-resolution stage on the result and ``_report_step`` reports it.
``_protected_micro_step`` is the one wrapper that holds fault injection, the compile fallback and
out-of-memory handling around the step; it leaves the epoch with :class:`OOMSignal` or :class:`RedoStep`,
which the loop handles.

:class:`GeneratorStep` is a mixin of the Trainer, which provides the state, the parts, the settings and
``save``/``_count_skip``.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import replace

import torch

from moas.checkpoint import emergency_checkpoint_name
from moas.diffusion.objective import ObjectiveOutput
from moas.errors import MoasError
from moas.monitor.step_log import StepReport, report_step
from moas.train.deferred import PendingStep, networks
from moas.train.faults import first_line, free_memory, is_oom
from moas.train.inputs import StepDraws
from moas.train.sequences import ddp_touch
from moas.train.state import MicroResult

log = logging.getLogger("moas.train.loop")
error_log = logging.getLogger("moas.errors")


class _NoBar:
    """A progress bar's stand-in for values read after the epoch's bar closed."""

    def set_postfix(self, **_kw) -> None:
        pass


_NO_BAR = _NoBar()


class OOMSignal(Exception):
    """Raised inside the batch loop to leave it and recover from an out-of-memory error."""


class RedoStep(Exception):
    """Raised inside the batch loop to leave it and redo the current optimizer step from its start."""


class GeneratorStep:
    def _protected_micro_step(self, batch: dict, last_of_group: bool, bar) -> MicroResult:
        """One micro-step inside the run's fault handling: an injected fault fires here; an error of the
        compiled U-Net leaves the epoch to redo the step uncompiled (``RedoStep``); an out-of-memory error
        leaves it to recover (``OOMSignal``) once the failed pass's frames are gone."""
        try:
            self.faults.next_batch()
            return self._micro_step(batch, last_of_group)
        except Exception as exc:
            compiled = self.parts.compiled
            if compiled is not None and compiled.caused(exc):  # e.g. in the compiled backward
                compiled.fall_back(exc)
                bar.close()
                raise RedoStep from None
            if not is_oom(exc):
                raise
            self.oom_message = first_line(exc)
            bar.close()
            raise OOMSignal from None

    def _micro_step(self, batch: dict, last_of_group: bool) -> MicroResult:
        """Forward + backward of one micro-batch: its random draws, the generator's inputs, the objective,
        the extra losses, the NaN/Inf guard, backward."""
        st, s, device = self.state, self.settings, self.device
        x0, augment = self.inputs.images(batch, st.epoch, device)  # (B, 3, H, W), (B, AUG_DIM) | None
        b, j = x0.shape[0], st.micro_in_step
        if j == 0:  # the whole step's random numbers at once: a smaller micro-batch gets the same ones
            style_dropout = s.style_dropout if "style" in batch else None
            shape = tuple(x0.shape[1:])
            n = b * st.grad_accum
            self.draws = StepDraws.draw(
                st.gen, n, shape, self.objective.num_timesteps, s.cond_dropout, style_dropout
            )
        draws = self.draws.rows(j * b, (j + 1) * b)
        # Dropout (the brain's) and the degradations draw from torch's global RNG. Reseeding it from the
        # checkpointed stream makes them a function of that stream alone, so a resumed run draws the same
        # masks as an uninterrupted one whatever consumed the global RNG in between (sample grids,
        # validation and eval at checkpoints).
        torch.manual_seed(draws.seed + j)
        cond, panel_in = self.inputs(batch, draws, st.epoch, device, x0, augment)
        t, noise = draws.t.to(device), draws.noise.to(device)  # (B,), (B, 3, H, W)
        sync = nullcontext() if last_of_group or not self.dist.enabled else self.parts.ddp_model.no_sync()
        with sync:
            out = self.objective(self.parts.ddp_model, x0, cond, t, noise, self._autocast)
            loss, result = self._losses(out, x0, panel_in)
            loss, result.ok = self._guard(loss)
            self.parts.net.backward(loss / st.grad_accum)
        if self.faults.fires("inf_grad"):
            grad = next(p for p in self.parts.model.parameters() if p.grad is not None).grad
            grad.view(-1)[0] = float("inf")
        result.loss = loss.detach()
        return result

    def _losses(
        self, out: ObjectiveOutput, x0: torch.Tensor, panel_in: dict
    ) -> tuple[torch.Tensor, MicroResult]:
        """The diffusion loss + the brain's auxiliary loss + domain losses + temporal consistency, and what
        the step reports. The predicted x0 is computed only when a loss or the monitor uses it."""
        schedule, step = self.objective.schedule, self.state.global_step
        side, panels, monitor = self.parts.side, self.panels, self.monitor
        measured = monitor is not None and monitor.measures(step + 1)
        x0_pred = out.x0(schedule) if side.uses_x0 or measured else None
        aux = out.aux  # MoE load balance (+ compression reconstruction)
        loss = out.loss + aux
        terms = {
            "diffusion": out.loss.detach(),
            "aux": aux.detach() if torch.is_tensor(aux) else out.loss.new_tensor(aux),
        }
        extra, logs = side.generator_loss(x0, x0_pred, out.t, schedule, step)
        loss = loss if extra is None else loss + extra
        # The temporal loss takes its own graph branch of x0: gradients then reach the prediction summed in
        # the order they always have, which keeps training bit-identical to earlier releases.
        temporal_x0 = out.x0(schedule) if panels.uses_x0(panel_in) else None
        temporal, t_logs = panels.loss(panel_in, temporal_x0, out.t, schedule)
        if temporal is not None:
            loss = loss + temporal
            logs = {**logs, **t_logs}
        if self.dist.enabled:
            loss = loss + ddp_touch(self.parts.model, panel_in)
        critic = x0_pred.detach() if x0_pred is not None else None  # (B, 3, H, W)
        if measured:
            monitor.observe_batch(step + 1, x0, critic, out.t, out.per_sample)
        return loss, MicroResult(terms, logs, x0, critic)

    def _guard(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The NaN/Inf guard's first two parts: bound the loss, and flag a non-finite one on the device (no
        host read here). A non-finite loss is still backpropagated — every rank runs the same collectives —
        and its step is skipped by the guarded step, which reads the flag with the gradient norm."""
        loss = loss.clamp(max=self.settings.loss_clamp)
        if self.faults.fires("nan_loss"):
            loss = loss * float("nan")
        return loss, torch.isfinite(loss)

    def _optimizer_step(
        self, loss: torch.Tensor, ok: torch.Tensor, micro: MicroResult
    ) -> tuple[float, dict[str, float]] | None:
        """Apply the accumulated step (``ok``: every micro-batch's loss was finite, on the device) and the
        schedule; (the gradient norm, the last micro-batch's loss terms) as read on the host in the step's
        one read, or None when the guard skipped the step. With ``train.read_every`` > 1 the guard decides on
        the device and both are returned unread (the loss among the terms), for ``_flush_reads``."""
        st, p = self.state, self.parts
        if p.net.deferred:  # decided on the device; the values are read with the next ``_flush_reads``
            norm = p.net.apply(ok)
            p.sched.step()
            st.global_step += 1
            st.mark_boundary()
            return norm, {"loss": loss, **micro.terms}
        read = p.net.apply_reporting(
            ok, {"loss": loss, **micro.terms}
        )  # the guard's third part: skip a bad step
        if read is None:  # no optimizer, schedule or EMA update from this step
            if not math.isfinite(p.net.read[1]):  # the read holds the norm, then the loss
                log.warning("Non-finite loss at step %d; the step was skipped.", st.global_step + 1)
            self._count_skip(p.net, "train.lr")
            return None
        loss_value = read.pop("loss")
        p.sched.step()
        st.global_step += 1
        self.last_loss = self.dist.all_mean(loss_value)
        if p.adaptive is not None:
            lr = p.adaptive.observe(self.last_loss, p.sched.get_last_lr()[0])
            for g in p.opt.param_groups:
                g["lr"] = lr
        st.mark_boundary()  # the generator has learned from this step: an emergency checkpoint continues after it
        return p.net.read[0], read

    def _report_step(
        self,
        micro: MicroResult,
        read: tuple[float, dict[str, float]],
        scalars: dict,
        t_step: float,
        data_time: float,
        bar,
    ) -> None:
        """The step's log line, TensorBoard scalars and progress bar; then the resource manager's cleanup
        check and the thread governor."""
        st, p = self.state, self.parts
        now = time.perf_counter()
        self.ips = micro.x0.shape[0] * st.grad_accum * self.dist.world_size / max(now - t_step, 1e-9)
        deferred = self.ledger is not None
        terms = dict(read[1])
        loss = terms.pop("loss") if deferred else self.last_loss
        report = StepReport(
            step=st.global_step,
            epoch=st.epoch + 1,
            batch_pos=st.batch_pos,
            micro_batch=st.micro_batch,
            grad_accum=st.grad_accum,
            loss=loss,
            lr=p.lr(),
            images_per_sec=self.ips,
            step_time=now - t_step - data_time,
            data_time=data_time,
            grad_norm=read[0],
            terms=terms,
            lrs=p.lrs(),
            scalars=scalars,
        )
        resources = self.runtime.resources
        snap = resources.snapshot()  # one reading per step serves the log line and the cleanup check
        if deferred:
            self.ledger.add(PendingStep(report, resources.brief(snap), p.net.pending[-1]))
            if st.global_step % self.settings.read_every == 0:
                self._flush_reads(bar)
        else:
            report_step(self.monitor, report, resources.brief(snap), bar)
        resources.maybe_cleanup(snap)
        if self.runtime.governor is not None:
            self.runtime.governor.poll()

    def _flush_reads(self, bar=None) -> None:
        """Read the pending steps' values in one transfer (``train.read_every`` > 1), log each step, and
        account for the steps the guard skipped on the device."""
        ledger, p = self.ledger, self.parts
        if ledger is None or not len(ledger):
            return
        steps, flags = ledger.read()
        for net in networks(p):
            net.settle(flags.get(net.name, []))
        for step, ok in steps:
            if not ok:
                log.warning(
                    "Non-finite loss or gradient at step %d; its update was skipped.", step.report.step
                )
                self._count_skip(p.net, "train.lr")
                continue
            self.last_loss = self.dist.all_mean(step.report.loss)
            report_step(self.monitor, replace(step.report, loss=self.last_loss), step.brief, bar or _NO_BAR)

    def _side_steps(self, micro: MicroResult) -> dict[str, float]:
        """The discriminator's and the enhancer's steps. They recover from out of memory themselves (the same
        batch in more chunks); one that runs out even one image at a time ends the run after an emergency
        checkpoint."""
        st = self.state
        sr = self.parts.sr
        try:
            with self.clock("enhancer and discriminator"):
                scalars = self.parts.side.after_step(micro.x0, micro.x0_pred, st.global_step)
            if sr is not None and st.global_step % sr.cfg.every == 0:
                with self.clock("super-resolution stage"):
                    scalars.update(sr.step())
            return scalars
        except Exception as exc:
            if not is_oom(exc):
                raise
            message = first_line(exc)
        free_memory(self.device)
        path = self.save(emergency_checkpoint_name(st.boundary.epoch + 1, oom=True), kind="emergency_oom")
        error_log.error("Out of memory in a side network's step at step %d: %s.", st.global_step, message)
        raise MoasError(
            f"Out of memory in the discriminator, enhancer or super-resolution step even one image at a "
            f"time ({message}); emergency checkpoint {path} was saved. Lower "
            "enhance.batch_size, sr.batch_size or sr.crop (or turn enhance.train, sr.train or "
            "losses.adversarial off), then resume."
        )
