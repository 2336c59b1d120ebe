"""The training run: data → text bank → generator + EMA → AdamW/AMSGrad → checkpoints, TensorBoard.

``Trainer(cfg).run()`` reads top to bottom: ``__init__`` builds everything (and restores a checkpoint with
``--auto_resume``), ``run`` loops over epochs and micro-batches, ``_micro_step`` is one forward/backward,
``_optimizer_step`` applies an accumulated step, ``save`` writes a checkpoint. The step is
min-SNR-weighted v-prediction (or ε) with null-prompt dropout for classifier-free guidance; AMP (bf16,
else fp16 + GradScaler) on CUDA, fp32 on CPU; gradient accumulation, clipping and a NaN/Inf guard.

Exact resume: everything random in a step (condition dropout, t, noise) comes from ``self.gen``, a
``torch.Generator`` whose state is checkpointed; the batch order is a pure function of (seed, epoch)
(``moas.train.batches``); so the position in the epoch is (epoch, batch index). Checkpoints are only taken
at optimizer-step boundaries, and the *boundary* snapshot (position + generator state) is what is saved,
also by the emergency paths (out of memory, signals, crashes), so every checkpoint continues bit-identically.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moas.checkpoint import epoch_checkpoint_name
from moas.config import MoasConfig
from moas.data.artist_style import STYLE_DIM
from moas.data.dataset import smart_collate_fn, to_model_range
from moas.data.loader import caption_augment, loader_kwargs, loader_workers, save_style_db
from moas.data.sampler import BucketBatchSampler
from moas.device import autocast_dtype, resolve_device, seed_everything, set_threads
from moas.diffusion.schedule import NoiseSchedule, make_train_scheduler
from moas.errors import MoasError
from moas.models.generator import MoasGenerator, brain_aux_loss
from moas.monitor.run_folder import new_run_dir
from moas.monitor.run_monitor import build_run_monitor
from moas.monitor.step_log import report_step
from moas.resources import EnhancedResourceManager
from moas.text.language import language_batch
from moas.train import faults
from moas.train.adaptive import AdaptiveTrainingSystem
from moas.train.batches import ResumableBatchSampler, steps_per_epoch
from moas.train.continuous import AdvancedContinuousLearning
from moas.train.distributed import DistContext, broadcast_from_main, init_distributed
from moas.train.domain import DomainTraining
from moas.train.ema import EMA
from moas.train.oom import is_oom, recover_from_oom
from moas.train.optim import adamw
from moas.train.saving import milestone_epochs, save_trainer_checkpoint
from moas.train.schedule import WarmupCosineRestarts
from moas.train.sequences import PanelTraining, ddp_touch, memory_keep
from moas.train.setup import (
    check_disk_space,
    find_resume,
    load_training_data,
    log_resources,
    model_paths,
    write_model_files,
)
from moas.train.signals import GracefulStop, TrainingInterrupted
from moas.train.state import (
    emergency_save,
    model_file_state,
    restore_training_state,
    step_checkpoint_name,
)

log = logging.getLogger(__name__)
error_log = logging.getLogger("moas.errors")


@dataclass
class TrainResult:
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


@dataclass
class StepDraws:
    """Everything random in one optimizer step, drawn at its start for all its images, in this order: a
    seed for torch's global RNG, condition dropout, style-token dropout, timesteps, noise."""

    seed: int
    drop: torch.Tensor  # (N,) bool: train on the null prompt
    style_keep: torch.Tensor | None  # (N,) bool
    t: torch.Tensor  # (N,)
    noise: torch.Tensor  # (N, 3, H, W)

    @classmethod
    def draw(
        cls,
        gen: torch.Generator,
        n: int,
        shape: tuple[int, ...],
        num_timesteps: int,
        cond_dropout: float,
        style_dropout: float | None,
    ) -> StepDraws:
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        drop = torch.rand(n, generator=gen) < cond_dropout
        style_keep = None if style_dropout is None else torch.rand(n, generator=gen) >= style_dropout
        t = torch.randint(0, num_timesteps, (n,), generator=gen)
        return cls(seed, drop, style_keep, t, torch.randn((n, *shape), generator=gen))

    def rows(self, start: int, stop: int) -> StepDraws:
        keep = None if self.style_keep is None else self.style_keep[start:stop]
        return StepDraws(self.seed, self.drop[start:stop], keep, self.t[start:stop], self.noise[start:stop])


class _OOMSignal(Exception):
    """Raised inside the batch loop to leave it and recover from an out-of-memory error."""


class Trainer:
    def __init__(
        self,
        cfg: MoasConfig,
        progress: bool = True,
        dist_ctx: DistContext | None = None,
        dashboard: bool | None = None,
    ) -> None:
        tc = self.tc = cfg.train
        self.cfg, self.progress = cfg, progress
        if dist_ctx is None:
            dist_ctx, device_name = init_distributed(cfg.resources.device)
        else:
            device_name = cfg.resources.device
        self.dist = dist_ctx
        self.device = device = resolve_device(device_name)
        self.threads = set_threads(cfg.resources.cpu_threads)
        seed_everything(tc.seed)
        self.faults = faults.FaultInjector()
        self.resources = EnhancedResourceManager.from_config(cfg.resources, device)
        self.ckpt_dir = Path(tc.checkpoint_dir)
        self.resume_path, resume = find_resume(tc)
        data = load_training_data(cfg, resume, progress, device, self.threads)
        self.encoder, self.dataset, self.val_set = data.encoder, data.dataset, data.val_set
        self.captions, self.bank = data.captions, data.bank
        self.augment = caption_augment(cfg)  # a pure function of (seed, epoch, index): resumable

        # Model, EMA, optimizer, schedule.
        style_dim = STYLE_DIM if cfg.data.extract_style else 0
        brain = asdict(cfg.brain)
        saved_brain = (resume["model_args"].get("brain") or {}) if resume is not None else None
        for key in (
            "panel_memory",
            "memory_pooled",
            "memory_context",
        ):  # a checkpoint from before these: rebuilt without
            if saved_brain is not None and key not in saved_brain:
                brain.pop(key)
        self.model = MoasGenerator(
            cfg.data.resolution, asdict(cfg.model), asdict(cfg.text), style_dim, brain=brain
        ).place(device)
        bc = cfg.brain
        self.continuous = AdvancedContinuousLearning(bc.continuous_rate) if bc.continuous_learning else None
        self.ema = EMA(self.model, tc.ema_decay)
        self.opt = adamw(
            self.model.parameters(),
            lr=tc.lr,
            betas=tuple(tc.betas),
            weight_decay=tc.weight_decay,
            eps=tc.eps,
            amsgrad=tc.amsgrad,
        )
        per_rank = max(1, len(self.dataset) // self.dist.world_size)
        self.micro_batch = min(tc.batch_size, per_rank)
        self.grad_accum = tc.grad_accum_steps
        self.steps_per_epoch = steps_per_epoch(self._plan(), self.dist.world_size)
        if self.steps_per_epoch < 1:
            raise MoasError(
                f"No full batch can be formed from {self.dataset.root} for {self.dist.world_size} process(es) "
                "(too few images, or every sample weight is 0 — check multiply.txt files)."
            )
        self.sched = WarmupCosineRestarts(
            self.opt,
            tc.epochs,
            self.steps_per_epoch,
            tc.warmup_fraction,
            tc.restart_fraction,
            tc.restart_mult,
            tc.eta_min,
        )
        self.amp_dtype = autocast_dtype(device, tc.mixed_precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # Domain losses on x0, the discriminator and the enhancer (moas/train/domain.py; issue 5).
        self.domain = DomainTraining(cfg, self.dataset, device, self.amp_dtype is not None)
        self.domain_logs: dict[str, float] = {}
        # Panel sequences: memory inputs + temporal-consistency loss (moas/train/panels.py; issue 5).
        has_seq = self.model.panel_memory and self.dataset.has_sequences()
        if not self.model.panel_memory:
            self.dataset.panel_context = 0
        self.panels = PanelTraining(cfg, has_seq and tc.panel_context > 0)
        if self.panels.enabled:
            log.info(
                "Panel sequences: %d images follow a previous panel.",
                sum(j >= 0 for j in self.dataset.prev_indices()),
            )
        self.x0_batch = self.x0_pred = None
        self.schedule = NoiseSchedule(
            make_train_scheduler(cfg.diffusion), cfg.diffusion.prediction_type, cfg.diffusion.min_snr_gamma
        )
        self.adaptive = AdaptiveTrainingSystem(tc.adaptive_window, max_lr=1e-3) if tc.adaptive_lr else None
        # The step's own random stream; each rank draws different noise.
        self.gen = torch.Generator().manual_seed(tc.seed + 1_000_003 * self.dist.rank)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            "Generator: %.1fM parameters; %d steps/epoch × %d epochs; micro-batch %d × accumulation %d%s.",
            n_params / 1e6,
            self.steps_per_epoch,
            tc.epochs,
            self.micro_batch,
            self.grad_accum,
            f" × {self.dist.world_size} processes" if self.dist.enabled else "",
        )

        log_resources(self.resources, cfg)
        self.epoch, self.batch_pos, self.global_step = 0, 0, 0
        self.loss_terms: dict[str, float] = {}  # the last micro-step's loss terms, for TensorBoard
        self.skipped_steps, self.train_seconds_before = 0, 0.0
        previous_run = Path()
        if resume is not None:
            previous_run = restore_training_state(self, resume)
            self.domain.load_state_dict(resume.get("domain"))
            del resume
        self._mark_boundary()
        self.ddp_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)

        self.milestones = milestone_epochs(tc.epochs)
        if self.dist.is_main:  # before the run folder: a disk too small stops here with nothing written
            check_disk_space(self)
        # A resumed run keeps writing to its TensorBoard folder, so its curves continue.
        self.monitor = None
        self.run_dir = previous_run
        if self.dist.is_main:
            resumed_run = self.global_step > 0 and previous_run.name and previous_run.is_dir()
            self.run_dir = previous_run if resumed_run else new_run_dir(tc.run_dir, cfg.profile)
            (self.run_dir / "config.toml").write_text(cfg.to_toml())
            save_style_db(self.dataset, self.run_dir)
            self.monitor = build_run_monitor(
                self.run_dir,
                cfg,
                self.captions,
                self.encoder,
                val_set=self.val_set,
                bank=self.bank,
                schedule=self.schedule,
                device=device,
                batch_size=self.micro_batch,
                progress=progress if dashboard is None else dashboard,
            )
            total_steps = tc.epochs * self.steps_per_epoch
            self.monitor.set_status(  # for the dashboard's progress and ETA
                epochs=tc.epochs,
                total_steps=min(total_steps, tc.max_steps) if tc.max_steps else total_steps,
                session_start_step=self.global_step,
            )
        self.t_start = time.perf_counter()
        self.last_loss, self.ips = float("nan"), 0.0
        self.last_val_loss: float | None = None
        self.oom_error: BaseException | None = None
        self.group_bad = False

    # ----------------------------------------------------------------------------------- checkpoints
    def _mark_boundary(self) -> None:
        """Remember the last optimizer-step boundary: what every checkpoint (also emergencies) records."""
        self.boundary = (self.epoch, self.batch_pos, self.gen.get_state())

    def train_seconds(self) -> float:
        """Wall time spent in the training loop, summed over resumed sessions."""
        return self.train_seconds_before + time.perf_counter() - self.t_start

    def save(self, name: str, kind: str = "checkpoint") -> Path | None:
        """Write ``name`` in the checkpoint folder from the last step boundary (rank 0; collective)."""
        return save_trainer_checkpoint(self, name, kind)

    # ----------------------------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        with GracefulStop() as stopper:
            self.stopper = stopper
            try:
                while self.epoch < self.tc.epochs:
                    try:
                        finished = self._run_epoch()
                    except _OOMSignal:
                        recover_from_oom(self)
                        continue
                    if finished:
                        break
            except (MoasError, KeyboardInterrupt):
                raise
            except Exception as exc:
                emergency_save(self, exc)
                raise
        return self._finish()

    def _plan(self) -> BucketBatchSampler:
        """The batch plan: one unit per optimizer step (micro-batch × accumulation images of one aspect
        bucket, drawn by sample weight), a pure function of (seed, epoch) that a smaller micro-batch after
        an out-of-memory error does not change."""
        return BucketBatchSampler(
            self.dataset.bucket_ids,
            self.dataset.weights(),
            self.micro_batch * self.grad_accum,
            seed=self.tc.seed,
        )

    def _run_epoch(self) -> bool:
        """Train from the current position to the end of the epoch; True when the run should stop."""
        tc, cfg = self.tc, self.cfg
        sampler = ResumableBatchSampler(
            self._plan(), self.epoch, self.batch_pos, self.dist.rank, self.dist.world_size, self.micro_batch
        )
        n_batches = len(sampler.batches)
        kw = loader_kwargs(loader_workers(cfg.data.num_workers, cfg.resources.loader_workers), self.device)
        kw["persistent_workers"] = False  # a new loader per epoch (and after an out-of-memory recovery)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=smart_collate_fn, **kw)
        bar = tqdm(
            loader,
            desc=f"epoch {self.epoch + 1}/{tc.epochs}",
            unit="batch",
            disable=not self.progress or not self.dist.is_main,
            leave=False,
            initial=self.batch_pos,
            total=n_batches,
        )
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        self.group_bad = False
        stop = False
        t_data = time.perf_counter()
        for batch in bar:
            t0 = time.perf_counter()
            i = self.batch_pos
            try:
                self.faults.next_batch()
                if i % self.grad_accum == 0:
                    group_loss = 0.0
                group_loss += (
                    self._micro_step(batch, last_of_group=(i + 1) % self.grad_accum == 0) / self.grad_accum
                )
            except Exception as exc:
                if not is_oom(exc):
                    raise
                self.oom_error = exc
                bar.close()
                raise _OOMSignal from None
            self.batch_pos += 1
            if (i + 1) % self.grad_accum:
                continue
            self._optimizer_step(group_loss, batch["pixels"].shape[0], t0, t_data, bar)
            stop = self._at_boundary()
            if stop:
                break
            t_data = time.perf_counter()
        bar.close()
        if self.batch_pos >= n_batches:  # the epoch is complete
            self._end_epoch(stop)
            return stop or self.epoch >= tc.epochs
        self.save(step_checkpoint_name(self.global_step))  # max_steps mid-epoch
        return True

    def _micro_step(self, batch: dict, last_of_group: bool) -> float:
        """Forward + backward of one micro-batch; returns its loss (NaN when it was not finite)."""
        device, schedule = self.device, self.schedule
        x0 = to_model_range(batch["pixels"]).to(device)  # (B, 3, H, W)
        b = x0.shape[0]
        j = self.batch_pos % self.grad_accum  # this micro-batch's place in the optimizer step
        if j == 0:  # the whole step's random numbers at once: a smaller micro-batch gets the same ones
            self.draws = StepDraws.draw(
                self.gen,
                b * self.grad_accum,
                tuple(x0.shape[1:]),
                schedule.num_timesteps,
                self.cfg.diffusion.cond_dropout,
                self.cfg.data.style_dropout if "style" in batch else None,
            )
        d = self.draws.rows(j * b, (j + 1) * b)
        # Dropout (the brain's) and the degradations draw from torch's global RNG. Reseeding it from the
        # checkpointed step stream makes them a function of that stream alone, so a resumed run draws the
        # same masks as an uninterrupted one whatever consumed the global RNG in between (sample grids,
        # validation and eval at checkpoints).
        torch.manual_seed(d.seed + j)
        drop = d.drop  # (B,)
        captions = [
            self.augment(c, self.tc.seed, self.epoch, int(j))
            for c, j in zip(batch["captions"], batch["index"], strict=True)
        ]
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        text = self.bank.batch(captions, device, cache=not self.augment.active)
        text.update(language_batch(captions, device))  # the story expert's language
        if "style" in batch:  # the style token, hidden for style_dropout of the rows
            keep = batch["has_style"] & d.style_keep  # (B,)
            text.update({"style": batch["style"].to(device), "style_mask": keep.to(device)})
        keep = memory_keep(drop, captions, list(batch["captions"]))  # memory goes with the text
        panel_in = self.panels.inputs(batch, keep, device)
        text.update(panel_in)
        t = d.t.to(device)  # (B,)
        noise = d.noise.to(device)  # (B, 3, H, W)
        x_t = schedule.add_noise(x0, noise, t)
        sync = nullcontext() if last_of_group or not self.dist.enabled else self.ddp_model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext():
                pred = self.ddp_model(x_t, t, text)  # (B, 3, H, W)
            per_sample = F.mse_loss(pred.float(), schedule.target(x0, noise, t), reduction="none").mean(
                (1, 2, 3)
            )  # (B,)
            diffusion = (per_sample * schedule.loss_weight(t)).mean()
            aux = brain_aux_loss(self.model)  # MoE load balance (+ compression reconstruction)
            loss = diffusion + aux
            self.loss_terms = {
                "diffusion": diffusion.item(),
                "aux": float(aux.detach() if torch.is_tensor(aux) else aux),
            }
            extra, self.domain_logs, self.x0_pred = self.domain.generator_loss(
                x0, x_t, pred, t, schedule, self.global_step
            )
            loss = loss if extra is None else loss + extra
            temporal, t_logs = self.panels.loss(panel_in, x_t, pred, t, schedule)
            if temporal is not None:
                loss = loss + temporal
                self.domain_logs = {**self.domain_logs, **t_logs}
            if self.dist.enabled:
                loss = loss + ddp_touch(self.model, panel_in)
            self.x0_batch = x0
            if self.monitor is not None:
                x0_pred = self.x0_pred
                if x0_pred is None:
                    x0_pred = schedule.predict_x0(x_t, pred.detach().float(), t)  # (B, 3, H, W)
                self.monitor.observe_batch(self.global_step + 1, x0, x0_pred, t, per_sample)
            loss = loss.clamp(max=self.tc.loss_clamp)  # NaN/Inf guard, part 1: bound the loss
            if self.faults.fires("nan_loss"):
                loss = loss * float("nan")
            if not torch.isfinite(loss):  # part 2: never learn from a non-finite loss
                self.group_bad = True
                log.warning("Non-finite loss at step %d; the step will be skipped.", self.global_step + 1)
                loss = pred.sum() * 0.0  # keeps DDP's collective backward in step on every rank
            self.scaler.scale(loss / self.grad_accum).backward()
        if self.faults.fires("inf_grad"):
            next(p for p in self.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return float("nan") if self.group_bad else loss.item()

    def _optimizer_step(self, loss: float, b: int, t0: float, t_data: float, bar) -> None:
        tc, opt = self.tc, self.opt
        self.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.max_grad_norm)
        bad = self.dist.all_max(float(self.group_bad or not torch.isfinite(grad_norm)))
        self.group_bad = False
        if bad:  # NaN/Inf guard, part 3: no optimizer, schedule or EMA update from this step
            if self.scaler.is_enabled():
                self.scaler.update()  # lowers the fp16 loss scale
            opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            log.warning(
                "Skipped an optimizer step (non-finite loss or gradient; %d so far).", self.skipped_steps
            )
            return
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.global_step += 1
        self.last_loss = self.dist.all_mean(loss)
        if self.adaptive is not None:
            lr = self.adaptive.observe(self.last_loss, self.sched.get_last_lr()[0])
            for g in opt.param_groups:
                g["lr"] = lr
        self.ema.update(self.model)
        domain_logs = {
            **self.domain_logs,
            **self.domain.after_step(self.x0_batch, self.x0_pred, self.global_step),
        }
        now = time.perf_counter()
        step_time = now - t0
        self.ips = b * self.grad_accum * self.dist.world_size / max(now - t_data, 1e-9)
        report_step(self, float(grad_norm), step_time, t0 - t_data, domain_logs, bar)

    def _at_boundary(self) -> bool:
        """After each optimizer step: remember the boundary, react to signals, periodic saves, max_steps."""
        self._mark_boundary()
        signum = int(self.dist.all_max(self.stopper.signum or 0))
        if signum:
            path = self.save(step_checkpoint_name(self.global_step), kind="signal")
            raise TrainingInterrupted(
                f"Stopped by signal {signum} at step {self.global_step}; checkpoint {path or self.ckpt_dir} "
                "was saved; rerun the same command with --auto_resume to continue.",
                signum,
            )
        if self.tc.save_every_steps and self.global_step % self.tc.save_every_steps == 0:
            self.save(step_checkpoint_name(self.global_step))
        self.resources.maybe_cleanup()
        return bool(self.tc.max_steps and self.global_step >= self.tc.max_steps)

    def _end_epoch(self, stop: bool) -> None:
        tc = self.tc
        self.epoch += 1
        self.batch_pos = 0
        self._mark_boundary()
        done = self.epoch
        moe = self.model.stage("moe")
        if self.continuous is not None and moe is not None:  # between epochs, no gradients
            self.continuous.update(moe)
            broadcast_from_main([moe.balance_bias, moe.experts.expert_weights])  # rank 0's adjustment
            self.ema.model.stage("moe").balance_bias.copy_(moe.balance_bias)  # keep the last adjustment
        if self.monitor is not None:
            self.monitor.log_brain(self.global_step, self.model)
        last = done == tc.epochs or stop
        log.info(
            "Epoch %d/%d: loss %.4f, lr %.2e, %.1f img/s.",
            done,
            tc.epochs,
            self.last_loss,
            self.opt.param_groups[0]["lr"],
            self.ips,
        )
        if done % tc.save_every == 0 or last or done in self.milestones:
            self.save(epoch_checkpoint_name(done), kind="epoch")
            if self.monitor is not None:  # validation, best-model file, progress.png (rank 0)
                metrics = self.monitor.on_checkpoint(
                    done, self.global_step, self.ema.model, self._model_state
                )
                self.last_val_loss = metrics.get("loss", self.last_val_loss)
        if self.monitor is not None and tc.sample_every and (done % tc.sample_every == 0 or last):
            self.monitor.sample_grid(self.ema.model, done, self.global_step, self.device)

    def _model_state(self) -> dict:
        return (
            model_file_state(
                self.model,
                self.ema,
                self.cfg,
                self.encoder.encoder_id,
                self.epoch,
                self.global_step,
                self.dataset.style_db.to_dict() if self.cfg.data.extract_style else None,
            )
            | self.domain.model_file_entries()
        )  # the trained enhancer (issue 5)

    def _finish(self) -> TrainResult:
        model_path, last_path = model_paths(self.tc.save_path)
        if self.dist.is_main:
            write_model_files(self, model_path, last_path)
        self.dist.barrier()
        return TrainResult(
            self.run_dir,
            model_path,
            self.epoch,
            self.global_step,
            self.last_loss,
            self.ips,
            self.skipped_steps,
            self.micro_batch,
            self.grad_accum,
            last_path,
        )


def train(cfg: MoasConfig, progress: bool = True, dashboard: bool | None = None) -> TrainResult:
    """Train (or, with ``train.auto_resume``, continue) the run described by ``cfg``.

    ``progress``: tqdm bars; ``dashboard``: the live dashboard (default: as ``progress``)."""
    return Trainer(cfg, progress, dashboard=dashboard).run()
