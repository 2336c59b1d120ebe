"""The training run, top to bottom.

``Trainer.run`` loops over epochs; ``_run_epoch`` over one epoch's micro-batches; ``_micro_step`` is one
forward/backward — the step's random draws, the generator's inputs, the diffusion objective, the extra
losses, the NaN/Inf guard, backward; ``_optimizer_step`` applies an accumulated step, ``_side_steps``
trains the side networks on it and ``_report_step`` reports it; ``_at_boundary`` reacts to signals and
periodic saves; ``_end_epoch`` does the work between epochs
(continuous learning, checkpoint, validation, sample grid). ``moas.train.builders.build_trainer`` builds
everything from the config; where the run is lives in a :class:`~moas.train.state.TrainState`.

The objective is min-SNR-weighted v-prediction (or ε) with null-prompt dropout for classifier-free
guidance; AMP (bf16, else fp16 + GradScaler; ``moas.train.trained_net``) on CUDA, fp32 on CPU unless asked;
gradient accumulation, clipping, a NaN/Inf guard, EMA.

Exact resume: everything random in a step comes from the state's generator, whose state is checkpointed
(``moas.train.inputs.StepDraws``); the batch plan is a pure function of (seed, epoch); checkpoints are taken at
optimizer-step boundaries only, and the boundary is what every checkpoint records — also the emergency
ones (out of memory, signals, crashes) — so every checkpoint continues bit-identically.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moas.checkpoint import emergency_checkpoint_name, epoch_checkpoint_name, step_checkpoint_name
from moas.data.loader import batch_loader
from moas.diffusion.objective import DiffusionObjective, ObjectiveOutput
from moas.errors import MoasError
from moas.monitor.phases import PhaseClock, save_timings
from moas.monitor.step_log import StepReport, report_step
from moas.train.batches import ResumableBatchSampler, RunBatchSampler
from moas.train.builders import build_run
from moas.train.distributed import broadcast_from_main
from moas.train.faults import (
    FaultInjector,
    GracefulStop,
    TrainingInterrupted,
    first_line,
    free_memory,
    is_oom,
    shrink_micro_batch,
)
from moas.train.inputs import StepDraws, TrainingInputs
from moas.train.parts import LoopSettings, Runtime, TrainingData, TrainingParts
from moas.train.saving import (
    CheckpointPolicy,
    RunRecord,
    model_file_contents,
    save_at_boundary,
    write_final_models,
)
from moas.train.sequences import PanelTraining, ddp_touch
from moas.train.state import MicroResult, TrainResult, TrainState
from moas.train.trained_net import autocast_factory

log = logging.getLogger(__name__)
error_log = logging.getLogger("moas.errors")


class _OOMSignal(Exception):
    """Raised inside the batch loop to leave it and recover from an out-of-memory error."""


class _RedoStep(Exception):
    """Raised inside the batch loop to leave it and redo the current optimizer step from its start."""


class Trainer:
    def __init__(
        self,
        *,
        settings: LoopSettings,
        state: TrainState,
        parts: TrainingParts,
        data: TrainingData,
        objective: DiffusionObjective,
        inputs: TrainingInputs,
        panels: PanelTraining,
        plan,  # (micro-batch, accumulation) -> BatchPlan
        runtime: Runtime,
        record: RunRecord,
        policy: CheckpointPolicy,
        monitor,  # RunMonitor on rank 0, else None
        faults: FaultInjector,
        model_paths: tuple[Path, Path],  # (the model for generation, the last weights)
        progress: bool = True,
        clock: PhaseClock | None = None,  # where the run's time goes (started by the builders)
    ) -> None:
        self.settings, self.state, self.parts, self.data = settings, state, parts, data
        self.objective, self.inputs, self.panels, self.plan = objective, inputs, panels, plan
        self.runtime, self.record, self.policy, self.monitor = runtime, record, policy, monitor
        self.faults, self.model_paths, self.progress = faults, model_paths, progress
        self.clock = clock or PhaseClock()
        self.dist, self.device = runtime.dist, runtime.device
        self._autocast = autocast_factory(self.device, runtime.amp_dtype)
        self.stopper: GracefulStop | None = None
        self.draws: StepDraws | None = None  # the current optimizer step's random numbers
        self.last_loss, self.ips = float("nan"), 0.0
        self.oom_message = ""  # the out-of-memory error's first line (the error would keep its activations)
        self._batches = RunBatchSampler()  # moved to each epoch's position; the loader stays
        self._data_loader: DataLoader | None = None

    def _loader(self) -> DataLoader:
        """The run's one DataLoader: its worker processes (spawned, persistent) live as long as the run."""
        if self._data_loader is None:
            s = self.settings
            self._data_loader = batch_loader(self.data.dataset, self._batches, s.loader_workers, self.device)
        return self._data_loader

    # ----------------------------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        with GracefulStop() as stopper:
            self.stopper = stopper
            try:
                while self.state.epoch < self.settings.epochs:
                    try:
                        with self.clock("generator steps"):  # the phases inside are timed apart
                            finished = self._run_epoch()
                    except _OOMSignal:
                        finished = None  # recovered below, once the error and what its frames hold are gone
                    except _RedoStep:  # the compiled U-Net failed inside a step: redo it uncompiled
                        self.parts.opt.zero_grad(set_to_none=True)
                        self.draws = None
                        self.state = self.state.at_boundary()
                        continue
                    if finished is None:
                        self._recover_from_oom()
                    elif finished:
                        break
            except (MoasError, KeyboardInterrupt):
                raise
            except Exception as exc:
                self._emergency_save(exc)
                raise
            finally:
                # The loader's iterator stops its persistent workers when it is freed.
                self._data_loader = None
        return self._finish()

    def _run_epoch(self) -> bool:
        """Train from the current position to the end of the epoch; True when the run should stop."""
        st = self.state
        sampler = ResumableBatchSampler(
            self.plan(st.micro_batch, st.grad_accum),
            st.epoch,
            st.batch_pos,
            self.dist.rank,
            self.dist.world_size,
            st.micro_batch,
        )
        n_batches = len(sampler.batches)
        self._batches.position(sampler)
        bar = tqdm(
            self._loader(),
            desc=f"epoch {st.epoch + 1}/{self.settings.epochs}",
            unit="batch",
            disable=not self.progress or not self.dist.is_main,
            leave=False,
            initial=st.batch_pos,
            total=n_batches,
        )
        self.parts.model.train()
        self.parts.opt.zero_grad(set_to_none=True)
        stop = False
        t_data = time.perf_counter()
        group_loss, group_ok, t_step, data_time = 0.0, True, t_data, 0.0
        for batch in bar:
            t_batch = time.perf_counter()
            j = st.micro_in_step
            if j == 0:  # a new optimizer step
                group_loss, group_ok, t_step, data_time = 0.0, True, t_data, 0.0
            data_time += t_batch - t_data
            micro = self._protected_micro_step(batch, j + 1 == st.grad_accum, bar)
            group_loss += micro.loss / st.grad_accum
            group_ok = group_ok and micro.ok
            st.batch_pos += 1
            t_data = time.perf_counter()
            if j + 1 < st.grad_accum:
                continue
            grad_norm = self._optimizer_step(group_loss, group_ok)
            if grad_norm is not None:  # the side networks learn from the step's images and predicted x0
                scalars = {**micro.logs, **self._side_steps(micro)}
                self._report_step(micro, grad_norm, scalars, t_step, data_time, bar)
            stop = self._at_boundary()
            if stop:
                break
            t_data = time.perf_counter()
        bar.close()
        if st.batch_pos >= n_batches:  # the epoch is complete
            self._end_epoch(stop)
            return stop or st.epoch >= self.settings.epochs
        self.save(step_checkpoint_name(st.global_step))  # max_steps mid-epoch
        return True

    def _protected_micro_step(self, batch: dict, last_of_group: bool, bar) -> MicroResult:
        """One micro-step inside the run's fault handling: an injected fault fires here; an error of the
        compiled U-Net leaves the epoch to redo the step uncompiled (``_RedoStep``); an out-of-memory error
        leaves it to recover (``_OOMSignal``) once the failed pass's frames are gone."""
        try:
            self.faults.next_batch()
            return self._micro_step(batch, last_of_group)
        except Exception as exc:
            compiled = self.parts.compiled
            if compiled is not None and compiled.caused(exc):  # e.g. in the compiled backward
                compiled.fall_back(exc)
                bar.close()
                raise _RedoStep from None
            if not is_oom(exc):
                raise
            self.oom_message = first_line(exc)
            bar.close()
            raise _OOMSignal from None

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
            loss, result.ok = self._guard(loss, out.pred)
            self.parts.net.backward(loss / st.grad_accum)
        if self.faults.fires("inf_grad"):
            grad = next(p for p in self.parts.model.parameters() if p.grad is not None).grad
            grad.view(-1)[0] = float("inf")
        result.loss = loss.item() if result.ok else float("nan")
        return result

    def _losses(
        self, out: ObjectiveOutput, x0: torch.Tensor, panel_in: dict
    ) -> tuple[torch.Tensor, MicroResult]:
        """The diffusion loss + the brain's auxiliary loss + domain losses + temporal consistency, and what
        the step reports. The predicted x0 is computed only when a loss or the monitor uses it."""
        schedule, step = self.objective.schedule, self.state.global_step
        domain, panels, monitor = self.parts.domain, self.panels, self.monitor
        measured = monitor is not None and monitor.measures(step + 1)
        x0_pred = out.x0(schedule) if domain.uses_x0 or measured else None
        aux = out.aux  # MoE load balance (+ compression reconstruction)
        loss = out.loss + aux
        terms = {"diffusion": out.loss.item(), "aux": float(aux.detach() if torch.is_tensor(aux) else aux)}
        extra, logs = domain.generator_loss(x0, x0_pred, out.t, schedule, step)
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

    def _guard(self, loss: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The NaN/Inf guard's first two parts: bound the loss, and never learn from a non-finite one;
        (the loss to backpropagate, whether it was finite)."""
        loss = loss.clamp(max=self.settings.loss_clamp)
        if self.faults.fires("nan_loss"):
            loss = loss * float("nan")
        if torch.isfinite(loss):
            return loss, True
        log.warning("Non-finite loss at step %d; the step will be skipped.", self.state.global_step + 1)
        return pred.sum() * 0.0, False  # the zero keeps DDP's collective backward in step on every rank

    def _optimizer_step(self, loss: float, ok: bool) -> torch.Tensor | None:
        """Apply the accumulated step (``ok``: every micro-batch's loss was finite) and the schedule; the
        gradient norm, or None when the guard skipped the step."""
        st, p = self.state, self.parts
        grad_norm = p.net.apply(ok)  # the NaN/Inf guard's third part: skip a bad step
        if grad_norm is None:  # no optimizer, schedule or EMA update from this step
            st.skipped_steps += 1
            return None
        p.sched.step()
        st.global_step += 1
        self.last_loss = self.dist.all_mean(loss)
        if p.adaptive is not None:
            lr = p.adaptive.observe(self.last_loss, p.sched.get_last_lr()[0])
            for g in p.opt.param_groups:
                g["lr"] = lr
        st.mark_boundary()  # the generator has learned from this step: an emergency checkpoint continues after it
        return grad_norm

    def _report_step(
        self, micro: MicroResult, grad_norm: torch.Tensor, scalars: dict, t_step: float, data_time: float, bar
    ) -> None:
        """The step's log line, TensorBoard scalars and progress bar; then the resource manager's cleanup
        check and the thread governor."""
        st, p = self.state, self.parts
        now = time.perf_counter()
        self.ips = micro.x0.shape[0] * st.grad_accum * self.dist.world_size / max(now - t_step, 1e-9)
        report = StepReport(
            step=st.global_step,
            epoch=st.epoch + 1,
            batch_pos=st.batch_pos,
            micro_batch=st.micro_batch,
            grad_accum=st.grad_accum,
            loss=self.last_loss,
            lr=p.lr(),
            images_per_sec=self.ips,
            step_time=now - t_step - data_time,
            data_time=data_time,
            grad_norm=float(grad_norm),
            terms=micro.terms,
            lrs=p.lrs(),
            scalars=scalars,
        )
        resources = self.runtime.resources
        snap = resources.snapshot()  # one reading per step serves the log line and the cleanup check
        report_step(self.monitor, report, resources.brief(snap), bar)
        resources.maybe_cleanup(snap)
        if self.runtime.governor is not None:
            self.runtime.governor.poll()

    def _side_steps(self, micro: MicroResult) -> dict[str, float]:
        """The discriminator's and the enhancer's steps. They recover from out of memory themselves (the same
        batch in more chunks); one that runs out even one image at a time ends the run after an emergency
        checkpoint."""
        st = self.state
        sr = self.parts.sr
        try:
            with self.clock("enhancer and discriminator"):
                scalars = self.parts.domain.after_step(micro.x0, micro.x0_pred, st.global_step)
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
            f"Out of memory in the discriminator or enhancer step even one image at a time, or in the "
            f"super-resolution step ({message}); emergency checkpoint {path} was saved. Lower "
            "enhance.batch_size, sr.batch_size or sr.crop (or turn enhance.train, sr.train or "
            "losses.adversarial off), then resume."
        )

    def _at_boundary(self) -> bool:
        """After each optimizer step: remember the boundary, react to signals, periodic saves, max_steps."""
        st, s = self.state, self.settings
        st.mark_boundary()
        signum = int(self.dist.all_max(self.stopper.signum or 0))
        if signum:
            path = self.save(step_checkpoint_name(st.global_step), kind="signal")
            raise TrainingInterrupted(
                f"Stopped by signal {signum} at step {st.global_step}; checkpoint "
                f"{path or self.policy.directory} was saved; rerun the same command with --auto_resume "
                "to continue.",
                signum,
            )
        if s.save_every_steps and st.global_step % s.save_every_steps == 0:
            self.save(step_checkpoint_name(st.global_step))
        return bool(s.max_steps and st.global_step >= s.max_steps)

    def _end_epoch(self, stop: bool) -> None:
        st, s, p = self.state, self.settings, self.parts
        st.epoch += 1
        st.batch_pos = 0
        st.mark_boundary()
        done = st.epoch
        moe = p.model.stage("moe")
        if p.continuous is not None and moe is not None:  # between epochs, no gradients
            p.continuous.update(moe)
            broadcast_from_main([moe.balance_bias, moe.experts.expert_weights])  # rank 0's adjustment
            p.ema.model.stage("moe").balance_bias.copy_(moe.balance_bias)  # keep the last adjustment
        if self.monitor is not None:
            self.monitor.log_brain(st.global_step, p.model)
        last = done == s.epochs or stop
        log.info(
            "Epoch %d/%d: loss %.4f, lr %.2e, %.1f img/s.", done, s.epochs, self.last_loss, p.lr(), self.ips
        )
        # The grid first, so the model card of a model chosen at this epoch shows this epoch's samples.
        if self.monitor is not None and s.sample_every and (done % s.sample_every == 0 or last):
            with self.clock("sample grids"):
                self.monitor.sample_grid(p.ema.model, done, st.global_step, self.device)
        if done % s.save_every == 0 or last or done in self.policy.milestones:
            self.save(epoch_checkpoint_name(done), kind="epoch")
            if self.monitor is not None:  # validation, best-model file, progress.png (rank 0)
                with self.clock("validation and best step"):
                    self.monitor.on_checkpoint(done, st.global_step, p.ema.model, self._model_file)

    # ----------------------------------------------------------------------------------- files
    def save(self, name: str, kind: str = "checkpoint") -> Path | None:
        """Write ``name`` in the checkpoint folder from the last step boundary (rank 0; collective)."""
        with self.clock("checkpoints"):
            args = (self.state, self.parts, self.record, self.policy, self.dist, self.faults)
            return save_at_boundary(name, kind, *args)

    def _model_file(self):
        return model_file_contents(self.state, self.parts, self.record)

    def _recover_from_oom(self) -> None:
        """Emergency checkpoint, smaller micro-batch with more accumulation, new DataLoader, same images."""
        st, message = self.state, self.oom_message
        self.oom_message = ""
        self.parts.opt.zero_grad(set_to_none=True)
        self.draws = None  # redrawn when the step is redone
        free_memory(self.device)
        path = self.save(emergency_checkpoint_name(st.boundary.epoch + 1, oom=True), kind="emergency_oom")
        shrunk = shrink_micro_batch(st.micro_batch, st.grad_accum, self.settings.min_batch_size)
        error_log.error(
            "Out of memory at epoch %d, batch %d, step %d (micro-batch %d × %d): %s; emergency checkpoint %s; %s.",
            st.boundary.epoch + 1,
            st.batch_pos,
            st.global_step,
            st.micro_batch,
            st.grad_accum,
            message,
            path,
            f"recovering with micro-batch {shrunk[0]} × {shrunk[1]}" if shrunk else "cannot recover",
        )
        if shrunk is None:
            raise MoasError(
                f"Out of memory even at micro-batch {st.micro_batch} (the minimum is "
                f"{self.settings.min_batch_size}); emergency checkpoint {path} was saved. Lower "
                "data.resolution or the model size, then resume."
            )
        self.state = st.at_boundary(*shrunk)
        split = f"micro-batch {self.state.micro_batch} × accumulation {self.state.grad_accum}"
        log.warning("Recovered from out of memory: %s (effective batch kept).", split)

    def _emergency_save(self, exc: BaseException) -> None:
        """An unrecoverable error: write ``emergency_epoch_<N>.pt`` from the last boundary."""
        st = self.state
        try:
            path = self.save(emergency_checkpoint_name(st.boundary.epoch + 1), kind="emergency")
            status = f"emergency checkpoint {path} saved"
        except Exception as save_exc:  # the original error matters more; report both
            status = f"emergency checkpoint failed too ({save_exc})"
        error_log.error(
            "Unrecoverable error at epoch %d, step %d: %s: %s; %s.",
            st.epoch + 1,
            st.global_step,
            type(exc).__name__,
            exc,
            status,
            exc_info=exc,
        )

    def _finish(self) -> TrainResult:
        """Rank 0 at the end: the last weights always go to the last-model file; the model for generation
        holds the best-scoring checkpoint's weights (or the last ones when selection is off or never ran)."""
        st = self.state
        model_path, last_path = self.model_paths
        if self.dist.is_main:
            with self.clock("model files"):
                write_final_models(self.model_paths, self._model_file(), self.monitor.keeper, st.global_step)
            if self.record.style_db is not None:  # also beside the model file, readable without torch
                self.data.dataset.style_db.save(model_path.with_name(model_path.stem + ".styles.json"))
            self.monitor.close()
            log.info("Model for generation saved to %s (run folder %s).", model_path, self.record.run_dir)
            save_timings(self.record.run_dir, self.clock)
        self.dist.barrier()
        where = (st.epoch, st.global_step, self.last_loss, self.ips, st.skipped_steps)
        return TrainResult(self.record.run_dir, model_path, *where, st.micro_batch, st.grad_accum, last_path)


def build_trainer(cfg, progress: bool = True, dist_ctx=None, dashboard: bool | None = None) -> Trainer:
    """A Trainer for the run described by ``cfg`` (a ``MoasConfig``), resumed with ``train.auto_resume``."""
    return Trainer(**build_run(cfg, progress, dist_ctx, dashboard))


def train(cfg, progress: bool = True, dashboard: bool | None = None) -> TrainResult:
    """Train (or, with ``train.auto_resume``, continue) the run described by ``cfg`` (a ``MoasConfig``).

    ``progress``: tqdm bars; ``dashboard``: the live dashboard (default: as ``progress``)."""
    return build_trainer(cfg, progress, dashboard=dashboard).run()
