"""The training run, top to bottom.

``Trainer.run`` loops over epochs; ``_run_epoch`` over one epoch's micro-batches, each one step of the
generator (``moas.train.step``: the micro-step, the optimizer step, the side networks' steps, the report);
``_run_stage_epoch`` over the super-resolution stage's steps when only the stage trains (``--stage sr``,
the generator frozen); ``_at_boundary`` reacts to signals, periodic saves and max_steps; ``_end_epoch`` does
the work between epochs (continuous learning, checkpoint, validation, sample grid). Both kinds of run share
this loop: one signal handler, one checkpoint writer with its rotation, one resume, one emergency save.
``moas.train.builders.build_run`` builds everything from the config; where the run is lives in a
:class:`~moas.train.state.TrainState`.

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
from pathlib import Path

from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moas.checkpoint import emergency_checkpoint_name, epoch_checkpoint_name, step_checkpoint_name
from moas.data.loader import batch_loader
from moas.diffusion.objective import DiffusionObjective
from moas.errors import MoasError
from moas.monitor.phases import PhaseClock, save_timings
from moas.train.batches import ResumableBatchSampler, RunBatchSampler
from moas.train.builders import build_run
from moas.train.deferred import StepLedger, enable_deferred, networks
from moas.train.distributed import broadcast_from_main
from moas.train.faults import (
    FaultInjector,
    GracefulStop,
    TrainingInterrupted,
    checkpointing_first,
    first_line,
    free_memory,
    is_oom,
    recovery_split,
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
from moas.train.sequences import PanelTraining
from moas.train.state import TrainResult, TrainState
from moas.train.step import GeneratorStep, OOMSignal, RedoStep
from moas.train.trained_net import autocast_factory, wide_float

log = logging.getLogger(__name__)
error_log = logging.getLogger("moas.errors")

MAX_SKIPS_IN_A_ROW = 20  # skipped steps after which a network will not recover by itself


class Trainer(GeneratorStep):
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
        deferred = enable_deferred(parts, settings.read_every)
        self.ledger = StepLedger(networks(parts), self.device) if deferred else None
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
                    except OOMSignal:
                        finished = None  # recovered below, once the error and what its frames hold are gone
                    except RedoStep:  # the compiled U-Net failed inside a step: redo it uncompiled
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
                status = self._emergency_save(exc)
                if is_oom(exc):  # where no recovery applies (e.g. the optimizer's step): one sentence
                    raise MoasError(
                        f"Out of memory where the run cannot recover ({first_line(exc)}); {status}. Lower "
                        "data.resolution, train.batch_size or the model size, then resume."
                    ) from None
                raise
            finally:
                # The loader's iterator stops its persistent workers when it is freed.
                self._data_loader = None
                self.parts.close_loaders()
        return self._finish()

    def _run_epoch(self) -> bool:
        """Train from the current position to the end of the epoch; True when the run should stop."""
        if self.parts.frozen is not None:
            return self._run_stage_epoch()
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
            # On the device (read once per step), in float64 as the host summed it before.
            group_loss = group_loss + micro.loss.to(wide_float(micro.loss.device)) / st.grad_accum
            group_ok = group_ok & micro.ok
            st.batch_pos += 1
            t_data = time.perf_counter()
            if j + 1 < st.grad_accum:
                continue
            read = self._optimizer_step(group_loss, group_ok, micro)
            if read is not None:  # the side networks learn from the step's images and predicted x0
                scalars = {**micro.logs, **self._side_steps(micro)}
                self._report_step(micro, read, scalars, t_step, data_time, bar)
            stop = self._at_boundary()
            if stop:
                break
            t_data = time.perf_counter()
        self._flush_reads(bar)
        bar.close()
        return self._leave_epoch(stop, st.batch_pos >= n_batches)

    def _run_stage_epoch(self) -> bool:
        """``--stage sr``: the super-resolution stage's steps to the end of the epoch, the generator frozen.
        A step the guard skips does not count: the stage draws new crops and tries again."""
        st, s, sr = self.state, self.settings, self.parts.sr
        bar = tqdm(
            desc=f"super-resolution epoch {st.epoch + 1}/{s.epochs}",
            unit="step",
            disable=not self.progress or not self.dist.is_main,
            leave=False,
            initial=st.batch_pos,
            total=s.stage_steps,
        )
        stop = False
        while st.batch_pos < s.stage_steps and not stop:
            t_step = time.perf_counter()
            with self.clock("super-resolution stage"):
                scalars = sr.step()
            if not scalars:
                self._count_skip(sr.net, "sr.lr")
                continue
            st.batch_pos += 1
            st.global_step += 1
            self.last_loss = scalars["sr/loss"]
            self.ips = sr.cfg.batch_size / max(time.perf_counter() - t_step, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{self.last_loss:.4f}")
            if self.monitor is not None:
                for name, value in scalars.items():
                    self.monitor.scalar(name, value, st.global_step)
            stop = self._at_boundary()
        bar.close()
        return self._leave_epoch(stop, st.batch_pos >= s.stage_steps)

    def _leave_epoch(self, stop: bool, complete: bool) -> bool:
        """The end of ``_run_epoch`` or ``_run_stage_epoch``: the epoch's work when it is complete, else a
        checkpoint (max_steps mid-epoch); True when the run should stop."""
        if complete:
            self._end_epoch(stop)
            return stop or self.state.epoch >= self.settings.epochs
        self.save(step_checkpoint_name(self.state.global_step))
        return True

    def _count_skip(self, net, lr_key: str) -> None:
        """A step the guard skipped. A network whose loss or gradient stays non-finite for
        MAX_SKIPS_IN_A_ROW steps will not recover by itself: the run saves its last boundary and stops."""
        st = self.state
        st.skipped_steps += 1
        if net.in_a_row < MAX_SKIPS_IN_A_ROW:
            return
        path = self.save(step_checkpoint_name(st.global_step))
        raise MoasError(
            f"The {net.name}'s loss or gradient was not finite for {net.in_a_row} steps in a row (after "
            f"step {st.global_step}); checkpoint {path} was saved. Lower {lr_key}, or train with "
            'train.mixed_precision = "no" (fp32), then resume with --auto_resume.'
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
        done, trains = st.epoch, p.frozen is None  # the generator trains (else it is the base model's)
        moe = p.model.stage("moe")
        if trains and p.continuous is not None and moe is not None:  # between epochs, no gradients
            p.continuous.update(moe)
            broadcast_from_main([moe.balance_bias, moe.experts.expert_weights])  # rank 0's adjustment
            p.ema.model.stage("moe").balance_bias.copy_(moe.balance_bias)  # keep the last adjustment
        if trains and self.monitor is not None:
            self.monitor.log_brain(st.global_step, p.model)
        last = done == s.epochs or stop
        lr = p.lr() if trains else p.sr.net.opt.param_groups[0]["lr"]
        log.info("Epoch %d/%d: loss %.4f, lr %.2e, %.1f img/s.", done, s.epochs, self.last_loss, lr, self.ips)
        # The grid first, so the model card of a model chosen at this epoch shows this epoch's samples.
        m = self.monitor
        if m is not None and s.sample_every and (done % s.sample_every == 0 or last):
            with self.clock("sample grids"):
                self._unless_oom(
                    "the sample grid", m.sample_grid, p.ema.model, done, st.global_step, self.device
                )
        if done % s.save_every == 0 or last or done in self.policy.milestones:
            self.save(epoch_checkpoint_name(done), kind="epoch")
            if trains and m is not None:  # validation, best-model file, progress.png (rank 0)
                with self.clock("validation and best step"):
                    args = (done, st.global_step, p.ema.model, self._model_file)
                    self._unless_oom("validation and the folder evaluation", m.on_checkpoint, *args)

    def _unless_oom(self, what: str, work, *args) -> None:
        """Work between epochs that training does not need: out of memory skips it this time (logged)."""
        try:
            work(*args)
            return
        except Exception as exc:
            if not is_oom(exc):
                raise
            message = first_line(exc)
        free_memory(self.device)  # outside the except block: the failed pass's frames are gone
        error_log.error(
            "Out of memory in %s at step %d (%s); skipped this time, training goes on.",
            what,
            self.state.global_step,
            message,
        )

    # ----------------------------------------------------------------------------------- files
    def save(self, name: str, kind: str = "checkpoint") -> Path | None:
        """Write ``name`` in the checkpoint folder from the last step boundary (rank 0; collective)."""
        self._settle_before_save(kind)
        with self.clock("checkpoints"):
            args = (self.state, self.parts, self.record, self.policy, self.dist, self.faults)
            return save_at_boundary(name, kind, *args)

    def _settle_before_save(self, kind: str) -> None:
        """Read the pending steps first (a checkpoint records the skip counters). After an error the device
        may refuse the read: an emergency checkpoint is written anyway, with the counters as last read."""
        try:
            self._flush_reads()
        except MoasError:
            raise
        except Exception as exc:
            if not kind.startswith("emergency"):
                raise
            self.ledger.forget()
            log.warning("The last steps' values could not be read before the emergency save (%s).", exc)

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
        where = f"epoch {st.boundary.epoch + 1}, batch {st.batch_pos}, step {st.global_step}"
        min_batch, unet = self.settings.min_batch_size, self.parts.model.unet
        on = unet.unet.is_gradient_checkpointing
        if checkpointing_first(st.micro_batch, st.grad_accum, min_batch, self.device.type, on):
            unet.use_gradient_checkpointing()  # cheaper than a micro-batch too small to keep the GPU busy
            split = f"micro-batch {st.micro_batch} × {st.grad_accum}"
            error_log.error(
                "Out of memory at %s (%s); emergency checkpoint %s; recovering with gradient checkpointing "
                "at %s.",
                where,
                message,
                path,
                split,
            )
            self.state = st.at_boundary()
            return
        self.state = st.at_boundary(
            *recovery_split(st.micro_batch, st.grad_accum, min_batch, where, message, path)
        )

    def _emergency_save(self, exc: BaseException) -> str:
        """An unrecoverable error: write ``emergency_epoch_<N>.pt`` from the last boundary; what became of
        it, in words."""
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
        return status

    def _finish(self) -> TrainResult:
        """Rank 0 at the end: the last weights always go to the last-model file; the model for generation
        holds the best-scoring checkpoint's weights (or the last ones when selection is off or never ran)."""
        st = self.state
        model_path, last_path = self.model_paths
        if self.dist.is_main:
            with self.clock("model files"):
                stage_only = self.parts.frozen is not None
                keeper = self.monitor.keeper
                write_final_models(self.model_paths, self._model_file(), keeper, st.global_step, stage_only)
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
