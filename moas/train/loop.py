"""The training run: data → text bank → generator + EMA → AdamW/AMSGrad → checkpoints, TensorBoard.

One function, ``train(cfg)``, reads top to bottom. The step is min-SNR-weighted v-prediction (or ε) with
10 % null-prompt dropout for classifier-free guidance; AMP (bf16, else fp16 + GradScaler) on CUDA, fp32 on
CPU; gradient accumulation, clipping and a NaN/Inf guard; EMA weights are what generation uses.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moas.config import MoasConfig
from moas.data.dataset import to_model_range
from moas.data.loader import build_dataset, build_loader, caption_augment, save_style_db, style_inputs
from moas.data.style import STYLE_DIM
from moas.data.textbank import TextBank
from moas.diffusion.schedule import NoiseSchedule, make_train_scheduler
from moas.errors import CheckpointError
from moas.models.generator import MoasGenerator
from moas.monitor import RunMonitor
from moas.runtime import autocast_dtype, new_run_dir, resolve_device, seed_everything, set_threads
from moas.text import TextEncoder
from moas.train.checkpoint import (
    capture_rng_state,
    epoch_checkpoint_name,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    rotate_checkpoints,
    save_checkpoint,
)
from moas.train.ema import EMA
from moas.train.schedule import WarmupCosineRestarts
from moas.train.validate import validation_loss

log = logging.getLogger(__name__)

MILESTONES_260 = (40, 80, 120, 160, 200, 230, 260)  # the original's milestone epochs of a 260-epoch run


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    epochs_done: int
    global_step: int
    final_loss: float
    images_per_sec: float


def milestone_epochs(epochs: int) -> set[int]:
    """The original's milestones, scaled to this run's length; never rotated away."""
    return {max(1, round(m * epochs / 260)) for m in MILESTONES_260}


def model_file_state(
    model: MoasGenerator,
    ema: EMA,
    cfg: MoasConfig,
    encoder_id: str,
    epoch: int,
    step: int,
    style_db: dict | None = None,
) -> dict:
    """What generation needs: the EMA weights, the constructor arguments, config and text-encoder identity."""
    return {
        **({"style_db": style_db} if style_db else {}),
        "kind": "model",
        "model_args": model.init_args,
        "ema": {"model": ema.model.state_dict()},
        "config": cfg.to_dict(),
        "text_encoder": encoder_id,
        "epoch": epoch,
        "global_step": step,
    }


def train(cfg: MoasConfig, progress: bool = True) -> TrainResult:
    tc = cfg.train
    device = resolve_device(cfg.resources.device)
    threads = set_threads(cfg.resources.cpu_threads)
    seed_everything(tc.seed)
    ckpt_dir = Path(tc.checkpoint_dir)
    resume_path = find_latest_checkpoint(ckpt_dir) if tc.auto_resume else None
    resume = load_checkpoint(resume_path) if resume_path else None
    if tc.auto_resume and resume is None:
        log.info("--auto_resume: no valid checkpoint in %s; starting from scratch.", ckpt_dir)

    # Data.
    encoder = TextEncoder(
        cfg.text.model_name,
        max_tokens=cfg.text.max_tokens,
        require_id=resume["text_encoder"] if resume else None,
    )
    dataset = build_dataset(cfg, cfg.data.data_dir, encoder, progress)
    log.info(
        "Data: %d images in %s (%d skipped); device %s, %d threads.",
        len(dataset),
        cfg.data.data_dir,
        len(dataset.skipped),
        device,
        threads,
    )
    val_set = None
    if cfg.data.val_dir:
        val_set = build_dataset(cfg, cfg.data.val_dir, encoder, progress)
        log.info("Validation: %d images in %s.", len(val_set), cfg.data.val_dir)
    captions = dataset.captions()
    bank = TextBank(encoder, captions + (val_set.captions() if val_set else []), progress=progress)

    # Model, EMA, optimizer, schedule.
    style_dim = STYLE_DIM if cfg.data.extract_style else 0
    model = MoasGenerator(cfg.data.resolution, asdict(cfg.model), asdict(cfg.text), style_dim).to(device)
    ema = EMA(model, tc.ema_decay)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=tc.lr,
        betas=tuple(tc.betas),
        weight_decay=tc.weight_decay,
        eps=tc.eps,
        amsgrad=tc.amsgrad,
    )
    batch_size = min(tc.batch_size, len(dataset))
    shuffle_gen = torch.Generator().manual_seed(tc.seed)
    loader, batch_sampler = build_loader(cfg, dataset, batch_size, device)
    augment = caption_augment(cfg)
    steps_per_epoch = math.ceil(len(loader) / tc.grad_accum_steps)
    sched = WarmupCosineRestarts(
        opt, tc.epochs, steps_per_epoch, tc.warmup_fraction, tc.restart_fraction, tc.restart_mult, tc.eta_min
    )
    amp_dtype = autocast_dtype(device, tc.mixed_precision)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    schedule = NoiseSchedule(
        make_train_scheduler(cfg.diffusion), cfg.diffusion.prediction_type, cfg.diffusion.min_snr_gamma
    )
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "Generator: %.1fM parameters; %d steps/epoch × %d epochs.", n_params / 1e6, steps_per_epoch, tc.epochs
    )

    start_epoch, global_step, train_seconds_before = 0, 0, 0.0
    previous_run = Path()
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
            ema.load_state_dict(resume["ema"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            scaler.load_state_dict(resume["scaler"])
        except (KeyError, RuntimeError, ValueError):
            raise CheckpointError(
                f"Checkpoint {resume_path} does not match this configuration; resume with the settings it was trained with."
            ) from None
        start_epoch, global_step = int(resume["epoch"]), int(resume["global_step"])
        train_seconds_before = float(resume.get("train_seconds", 0.0))
        restore_rng_state(resume["rng"])
        shuffle_gen.set_state(resume["shuffle_rng"])
        log.info("Resumed from %s at epoch %d, step %d.", resume_path, start_epoch, global_step)
        previous_run = Path(resume.get("run_dir", ""))
        del resume

    # A resumed run keeps writing to its TensorBoard folder, so its curves continue.
    resumed_run = start_epoch > 0 and previous_run.name and previous_run.is_dir()
    run_dir = previous_run if resumed_run else new_run_dir(tc.run_dir, cfg.profile)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    save_style_db(dataset, run_dir)
    monitor = RunMonitor(run_dir, cfg, captions, encoder)
    milestones = milestone_epochs(tc.epochs)

    t_start = time.perf_counter()

    def train_seconds() -> float:
        """Wall time spent in the training loop, summed over resumed sessions."""
        return train_seconds_before + time.perf_counter() - t_start

    def save(epoch: int) -> Path:
        state = {
            "train_seconds": train_seconds(),
            "kind": "checkpoint",
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "global_step": global_step,
            "rng": capture_rng_state(),
            "shuffle_rng": shuffle_gen.get_state(),
            "config": cfg.to_dict(),
            "model_args": model.init_args,
            "text_encoder": encoder.encoder_id,
            "run_dir": str(run_dir),
        }
        path = save_checkpoint(
            ckpt_dir / epoch_checkpoint_name(epoch),
            state,
            {"epoch": epoch, "global_step": global_step, "train_seconds": round(state["train_seconds"], 2)},
        )
        rotate_checkpoints(
            ckpt_dir, keep=tc.keep_last, protect={epoch_checkpoint_name(m) for m in milestones}
        )
        return path

    model.train()
    last_loss, ips, skipped = float("nan"), 0.0, 0
    stop = False
    for epoch in range(start_epoch, tc.epochs):
        batch_sampler.set_epoch(epoch)
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="batch", disable=not progress, leave=False
        )
        t_data = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            t0 = time.perf_counter()
            x0 = to_model_range(batch["pixels"]).to(device)  # (B, 3, H, W)
            b = x0.shape[0]
            drop = torch.rand(b) < cfg.diffusion.cond_dropout
            captions = [
                augment(c, tc.seed, epoch, int(j))
                for c, j in zip(batch["captions"], batch["index"], strict=True)
            ]
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
            text = bank.batch(captions, device, cache=not augment.active)
            text.update(style_inputs(batch, cfg.data.style_dropout, device))
            t = torch.randint(0, schedule.num_timesteps, (b,), device=device)
            noise = torch.randn_like(x0)
            x_t = schedule.add_noise(x0, noise, t)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                pred = model(x_t, t, text)
            per_sample = F.mse_loss(pred.float(), schedule.target(x0, noise, t), reduction="none").mean(
                (1, 2, 3)
            )
            loss = (per_sample * schedule.loss_weight(t)).mean()
            loss = loss.clamp(max=tc.loss_clamp)  # NaN/Inf guard, part 1: bound the loss
            if not torch.isfinite(loss):  # part 2: never step on a non-finite loss
                skipped += 1
                log.warning("Non-finite loss at step %d; batch skipped (%d so far).", global_step, skipped)
                opt.zero_grad(set_to_none=True)
                continue
            scaler.scale(loss / tc.grad_accum_steps).backward()
            if (i + 1) % tc.grad_accum_steps == 0 or i + 1 == len(loader):
                scaler.unscale_(opt)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                ema.update(model)
                global_step += 1
                last_loss = loss.item()
                step_time = time.perf_counter() - t0
                ips = b * tc.grad_accum_steps / max(time.perf_counter() - t_data, 1e-9)
                monitor.log_step(
                    global_step,
                    loss=last_loss,
                    lr=sched.get_last_lr()[0],
                    images_per_sec=ips,
                    step_time=step_time,
                    data_time=t0 - t_data,
                    grad_norm=float(grad_norm),
                )
                bar.set_postfix(
                    loss=f"{last_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", img_s=f"{ips:.1f}"
                )
                if tc.max_steps and global_step >= tc.max_steps:
                    stop = True
                    break
            t_data = time.perf_counter()
        bar.close()
        done = epoch + 1
        last = done == tc.epochs or stop
        log.info(
            "Epoch %d/%d: loss %.4f, lr %.2e, %.1f img/s.",
            done,
            tc.epochs,
            last_loss,
            sched.get_last_lr()[0],
            ips,
        )
        if done % tc.save_every == 0 or last or done in milestones:
            if val_set is not None:
                val = validation_loss(ema.model, val_set, bank, schedule, device, batch_size, tc.seed)
                monitor.log_step(global_step, val_loss=val)
                log.info("Validation loss (EMA weights) after epoch %d: %.4f.", done, val)
            path = save(done)
            log.info("Saved checkpoint %s.", path)
        if tc.sample_every and (done % tc.sample_every == 0 or last):
            monitor.sample_grid(ema.model, done, global_step, device)
        if stop:
            break

    model_path = Path(tc.save_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        model_path,
        model_file_state(
            model,
            ema,
            cfg,
            encoder.encoder_id,
            done,
            global_step,
            dataset.style_db.to_dict() if cfg.data.extract_style else None,
        ),
        {"epoch": done, "global_step": global_step, "kind": "model"},
    )
    if cfg.data.extract_style:  # also beside the model file, readable without torch
        dataset.style_db.save(model_path.with_name(model_path.stem + ".styles.json"))
    monitor.close()
    log.info("Model for generation saved to %s (run folder %s).", model_path, run_dir)
    return TrainResult(run_dir, model_path, done, global_step, last_loss, ips)
