"""Builders: the only training code that reads the whole ``MoasConfig``.

Each builder turns config sections into a component that takes plain typed arguments. ``build_trainer``
assembles a run in a fixed order — seeding, data, generator, optimizer, side networks, resume — because
the weights' random initialisation depends on it, and checkpoints pin the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from moas.config import MoasConfig, deep_merge
from moas.data.artist_style import STYLE_DIM
from moas.data.augment import AUG_DIM
from moas.data.dataset import ArtDataset
from moas.data.loader import loader_workers, save_style_db
from moas.data.sampler import BucketBatchSampler
from moas.device import autocast_dtype, hardware_name, resolve_device, seed_everything, set_threads
from moas.diffusion.objective import DiffusionObjective
from moas.diffusion.schedule import NoiseSchedule, make_train_scheduler
from moas.errors import MoasError
from moas.inference.model_file import ModelFile, read_model_file
from moas.models.generator import MoasGenerator
from moas.models.upgrade import switched_off, upgrade_model_args
from moas.monitor.phases import PhaseClock
from moas.monitor.run_folder import new_run_dir
from moas.resources import EnhancedResourceManager
from moas.train.adaptive import AdaptiveTrainingSystem, AdvancedContinuousLearning
from moas.train.batches import steps_per_epoch
from moas.train.data_setup import (
    build_data,
    build_monitor,
    caption_augment,
    image_augment,
    training_data_summary,
)
from moas.train.disk import SavePolicy, bytes_of, check_disk_space, plan_disk
from moas.train.distributed import DistContext, init_distributed
from moas.train.faults import FaultInjector
from moas.train.inputs import TrainingInputs
from moas.train.lr_schedule import WarmupCosineRestarts
from moas.train.parts import GENERATOR_KEYS, LoopSettings, Runtime, TrainingData, TrainingParts
from moas.train.resume import (
    base_record,
    check_compatible,
    find_resume,
    load_base_enhancer,
    load_base_weights,
    read_base_model,
    resume_state,
)
from moas.train.saving import CheckpointPolicy, RunRecord, model_paths
from moas.train.sequences import PanelTraining
from moas.train.side_batches import hr_dataset
from moas.train.side_networks import SideNetworks
from moas.train.speed import speed_up_unet
from moas.train.sr_stage import SRStageTraining, stage_steps_per_epoch
from moas.train.state import TrainState
from moas.train.threads import thread_governor
from moas.train.trained_net import EMA, TrainedNet, adamw, grad_scaler

log = logging.getLogger("moas.train.loop")


def build_runtime(cfg: MoasConfig, dist_ctx: DistContext | None = None) -> Runtime:
    rc = cfg.resources
    if dist_ctx is None:
        dist_ctx, device_name = init_distributed(rc.device)
    else:
        device_name = rc.device
    device = resolve_device(device_name)
    threads = set_threads(rc.cpu_threads)
    resources = EnhancedResourceManager(
        rc.max_ram_gb, rc.max_vram_gb, rc.cpu_threads, rc.loader_workers, device
    )
    log.info("Budgets: %s.", rc.describe())
    governor = thread_governor(rc.adapt_threads, device, threads)
    amp = autocast_dtype(device, cfg.train.mixed_precision)
    return Runtime(dist_ctx, device, threads, resources, amp, governor)


FROZEN_DATA = ("resolution", "extract_style", "augment")  # data settings that shape the generator


def stage_config(cfg: MoasConfig) -> tuple[MoasConfig, ModelFile]:
    """The config of a run that trains the super-resolution stage alone, and the base model it adds it to."""
    path = Path(cfg.train.init_from or cfg.train.save_path)
    if not path.is_file():
        raise MoasError(
            f"--stage sr adds a super-resolution stage to a trained model, and there is none at {path}; "
            "train the base model first or name it with --init_from."
        )
    base = read_model_file(path)
    over: dict = {
        "sr": {"train": True},
        "train": {
            "init_from": str(path),
            "checkpoint_dir": str(Path(cfg.train.checkpoint_dir) / "sr"),  # apart from the base run's
            "sample_every": 0,
            "milestones": False,
            "compile": False,
        },
        "monitor": {"select_best": False, "folder_eval": False},
    }
    # The frozen generator is the base model's: its architecture and its inputs come from the base's config.
    saved = base.config
    over |= {k: saved[k] for k in ("model", "brain", "text") if k in saved}
    over["data"] = {k: v for k, v in saved.get("data", {}).items() if k in FROZEN_DATA}
    if over["data"].get("resolution", cfg.data.resolution) != cfg.data.resolution:
        log.info(
            "Base resolution %s from %s (not the profile's %d).",
            saved["data"]["resolution"],
            path,
            cfg.data.resolution,
        )
    return MoasConfig.from_dict(deep_merge(cfg.to_dict(), over)), base


def build_base(cfg: MoasConfig, resume_path: Path | None) -> ModelFile | None:
    """The ``--init_from`` model of a new run, checked against the run's architecture before minutes of
    data loading; None without one, and for a resumed run (its checkpoint holds the fine-tuned weights)."""
    if not cfg.train.init_from or resume_path is not None:
        if cfg.train.init_from:
            log.info("Resuming %s; --init_from was applied when this run started.", resume_path)
        return None
    base = read_base_model(cfg.train.init_from)
    with torch.device("meta"):
        run_args = MoasGenerator(**generator_args(cfg, base.model_args)).init_args
    check_compatible(base, cfg.train.init_from, run_args)
    return base


def generator_args(cfg: MoasConfig, saved_args: dict | None = None) -> dict:
    """The generator's constructor arguments from the config; a checkpoint from before a later brain
    feature (``saved_args``) is rebuilt without it, so its weights load strictly, and one from before the
    per-level head rule (or a fine-tune of such a model) keeps the head split it was trained with."""
    brain, model = asdict(cfg.brain), asdict(cfg.model)
    if saved_args is not None:  # old-file rules: moas.models.upgrade
        brain.update(switched_off(saved_args))
        model["legacy_head_count"] = upgrade_model_args(saved_args)["model"]["legacy_head_count"]
    style_dim = STYLE_DIM if cfg.data.extract_style else 0
    augment_dim = AUG_DIM if cfg.data.augment > 0 else 0
    if saved_args is not None:  # the saved weights decide; image_augment() turns a mismatch off
        augment_dim = int(saved_args.get("augment_dim", 0))
    return {
        "resolution": cfg.data.resolution,
        "model": model,
        "text": asdict(cfg.text),
        "style_dim": style_dim,
        "brain": brain,
        "augment_dim": augment_dim,
    }


def build_generator(cfg: MoasConfig, device: torch.device, saved_args: dict | None = None) -> MoasGenerator:
    return MoasGenerator(**generator_args(cfg, saved_args)).place(device)


def build_optimizer(cfg: MoasConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    tc = cfg.train
    return adamw(
        model.parameters(),
        lr=tc.lr,
        betas=tuple(tc.betas),
        weight_decay=tc.weight_decay,
        eps=tc.eps,
        amsgrad=tc.amsgrad,
    )


def build_schedule(cfg: MoasConfig, opt: torch.optim.Optimizer, steps_per_epoch: int) -> WarmupCosineRestarts:
    tc = cfg.train
    return WarmupCosineRestarts(
        opt,
        tc.epochs,
        steps_per_epoch,
        tc.warmup_fraction,
        tc.restart_fraction,
        tc.restart_mult,
        tc.eta_min,
    )


def build_plan(cfg: MoasConfig, dataset: ArtDataset, micro_batch: int, grad_accum: int) -> BucketBatchSampler:
    """The batch plan: one unit per optimizer step (micro-batch × accumulation images of one aspect bucket,
    drawn by sample weight), a pure function of (seed, epoch)."""
    return BucketBatchSampler(
        dataset.bucket_ids, dataset.weights(), micro_batch * grad_accum, seed=cfg.train.seed
    )


def side_loading(cfg: MoasConfig) -> tuple[int, int]:
    """(worker processes, RAM cache bytes) for each side network's images: at most 2 workers (a side step
    takes 8-16 images; the main loader's count for each would triple the processes) and the main RAM cache."""
    workers = min(2, loader_workers(cfg.data.num_workers, cfg.resources.loader_workers))
    return workers, int(cfg.data.ram_cache_gb * 2**30)


def build_side_networks(
    cfg: MoasConfig, dataset: ArtDataset, device: torch.device, amp_dtype: torch.dtype | None = None
) -> SideNetworks:
    tc = cfg.train
    workers, ram = side_loading(cfg)
    return SideNetworks(
        cfg.losses,
        cfg.enhance,
        dataset,
        device,
        generator_lr=tc.lr,
        weight_decay=tc.weight_decay,
        term_clamp=tc.loss_clamp,
        max_grad_norm=tc.max_grad_norm,
        seed=tc.seed,
        amp_dtype=amp_dtype,
        loader_workers=workers,
        ram_cache_bytes=ram,
    )


def build_sr_stage(
    cfg: MoasConfig, data: TrainingData, device: torch.device, amp_dtype: torch.dtype | None = None
) -> SRStageTraining | None:
    """The super-resolution stage, trained on the training images at ``sr.scale``× the base resolution."""
    sc = cfg.sr
    if not sc.train:
        return None
    side = cfg.data.resolution * sc.scale
    if sc.crop > side:
        raise MoasError(
            f"sr.crop ({sc.crop}) is larger than the super-resolution images ({side} px = data.resolution "
            f"× sr.scale); lower sr.crop."
        )
    workers, ram = side_loading(cfg)
    hr = hr_dataset(data.dataset, side, ram)
    tc = cfg.train
    return SRStageTraining(sc, hr, data.bank, device, tc.seed, amp_dtype, tc.max_grad_norm, workers)


def build_panels(cfg: MoasConfig, enabled: bool) -> PanelTraining:
    lc = cfg.losses
    return PanelTraining(
        enabled,
        lc.temporal_weight,
        lc.temporal_character_weight,
        lc.temporal_scene_weight,
        lc.low_noise_power,
        cfg.train.loss_clamp,
    )


def build_objective(cfg: MoasConfig) -> DiffusionObjective:
    dc = cfg.diffusion
    return DiffusionObjective(NoiseSchedule(make_train_scheduler(dc), dc.prediction_type, dc.min_snr_gamma))


def build_adaptive(cfg: MoasConfig) -> AdaptiveTrainingSystem | None:
    tc = cfg.train
    return AdaptiveTrainingSystem(tc.adaptive_window, max_lr=1e-3) if tc.adaptive_lr else None


def build_continuous(cfg: MoasConfig) -> AdvancedContinuousLearning | None:
    bc = cfg.brain
    return AdvancedContinuousLearning(bc.continuous_rate) if bc.continuous_learning else None


def build_ema(cfg: MoasConfig, model: torch.nn.Module) -> EMA:
    return EMA(model, cfg.train.ema_decay)


def build_parts(
    cfg: MoasConfig,
    runtime: Runtime,
    data: TrainingData,
    saved_args: dict | None,
    base: ModelFile | None = None,
) -> tuple[TrainingParts, TrainState, Callable[[int, int], BucketBatchSampler], int]:
    """(the trained objects, the starting state, the batch plan for a micro-batch split, steps per epoch).

    ``base``: the ``--init_from`` model whose weights the generator (and its EMA copy) start from; with
    ``train.stage = "sr"`` they stay frozen, and the stage is built first, as it always has been."""
    tc, dist, device = cfg.train, runtime.dist, runtime.device
    stage_only = build_sr_stage(cfg, data, device, runtime.amp_dtype) if tc.stage == "sr" else None
    model = build_generator(cfg, device, saved_args)
    if base is not None:
        load_base_weights(model, base, tc.init_from)
    continuous = build_continuous(cfg)
    ema = build_ema(cfg, model)
    compiled = speed_up_unet(
        model, ema.model, device, tc.channels_last, tc.gradient_checkpointing, tc.compile
    )
    opt = build_optimizer(cfg, model)
    state = TrainState(
        micro_batch=min(tc.batch_size, max(1, len(data.dataset) // dist.world_size)),
        grad_accum=tc.grad_accum_steps,
        gen=torch.Generator().manual_seed(tc.seed + 1_000_003 * dist.rank),  # each rank its own noise
    )

    def plan(micro_batch: int, grad_accum: int) -> BucketBatchSampler:
        return build_plan(cfg, data.dataset, micro_batch, grad_accum)

    steps = steps_per_epoch(plan(state.micro_batch, state.grad_accum), dist.world_size)
    if steps < 1:
        raise MoasError(
            f"No full batch can be formed from {data.dataset.root} for {dist.world_size} process(es) "
            "(too few images, or every sample weight is 0 — check multiply.txt files)."
        )
    sched = build_schedule(cfg, opt, steps)
    scaler = grad_scaler(device, runtime.amp_dtype)
    side = build_side_networks(cfg, data.dataset, device, runtime.amp_dtype)
    if base is not None:
        log.info(
            "Starting from the weights of %s%s; optimizer, schedule and step count are new.",
            tc.init_from,
            " (and its enhancer)" if load_base_enhancer(side.enhancer, base) else "",
        )
    adaptive = build_adaptive(cfg)
    net = TrainedNet(
        "generator",
        model,
        opt,
        scaler,
        GENERATOR_KEYS,
        max_grad_norm=tc.max_grad_norm,
        ema=ema,
        average=False,
    )
    parts = TrainingParts(net, model, sched, adaptive, continuous, side, compiled)
    parts.sr = stage_only or build_sr_stage(cfg, data, device, runtime.amp_dtype)
    parts.frozen = base if stage_only else None
    # The side networks' workers start while the run is still being built (the loop's run closes them); a
    # resumed run's first side batches restart their streams at the restored step counts.
    parts.start_loaders()
    log.info(
        "Generator: %.1fM parameters; %d steps/epoch × %d epochs; micro-batch %d × accumulation %d%s.",
        sum(p.numel() for p in model.parameters()) / 1e6,
        steps,
        tc.epochs,
        state.micro_batch,
        state.grad_accum,
        f" × {dist.world_size} processes" if dist.enabled else "",
    )
    return parts, state, plan, steps


def build_run_folder(
    cfg: MoasConfig,
    data: TrainingData,
    parts: TrainingParts,
    state: TrainState,
    previous_run: Path,
    policy: CheckpointPolicy,
) -> Path:
    """Rank 0: the disk check (before anything is written, so a disk too small leaves nothing behind),
    then the run folder — the previous one for a resumed run, so its TensorBoard curves continue."""
    tc, side = cfg.train, parts.side
    saves = SavePolicy.of(tc, policy.milestones)
    nets = (bytes_of(parts.model), bytes_of(side.enhancer), bytes_of(side.disc))
    sr = bytes_of(parts.sr.model if parts.sr is not None else None)
    check_disk_space(policy.directory, plan_disk(saves, *nets, amsgrad=tc.amsgrad, sr=sr))
    resumed_run = state.global_step > 0 and previous_run.name and previous_run.is_dir()
    run_dir = previous_run if resumed_run else new_run_dir(tc.run_dir, cfg.profile)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    save_style_db(data.dataset, run_dir)
    return run_dir


def loop_settings(cfg: MoasConfig, stage_steps: int = 0) -> LoopSettings:
    tc = cfg.train
    return LoopSettings(
        epochs=tc.epochs,
        max_steps=tc.max_steps,
        save_every=tc.save_every,
        save_every_steps=tc.save_every_steps,
        sample_every=tc.sample_every,
        max_grad_norm=tc.max_grad_norm,
        loss_clamp=tc.loss_clamp,
        min_batch_size=tc.min_batch_size,
        cond_dropout=cfg.diffusion.cond_dropout,
        style_dropout=cfg.data.style_dropout,
        loader_workers=loader_workers(cfg.data.num_workers, cfg.resources.loader_workers),
        read_every=tc.read_every,
        stage_steps=stage_steps,
    )


def build_inputs(
    cfg: MoasConfig, data: TrainingData, panels: PanelTraining, model: MoasGenerator
) -> TrainingInputs:
    """The generator's inputs per batch; the training image joins them when the experts' image targets train."""
    aux = cfg.brain.conditioning == "moas" and cfg.brain.aux_targets > 0
    image = image_augment(cfg, model)
    return TrainingInputs(data.bank, caption_augment(cfg), cfg.train.seed, panels, image, aux_image=aux)


def restore(
    resume: dict, path: Path, state: TrainState, parts: TrainingParts, dist: DistContext
) -> tuple[TrainState, Path]:
    """Every part of the run from its checkpoint; (the position, the previous run folder)."""
    state, previous_run = resume_state(resume, path, state, parts, dist.rank, dist.world_size)
    if parts.frozen is None:
        parts.side.load_state_dict(resume.get("domain"))
    if parts.sr is not None:
        parts.sr.load_state_dict(resume.get("sr"))
    return state, previous_run


def ddp_wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def build_run(
    cfg: MoasConfig, progress: bool = True, dist_ctx: DistContext | None = None, dashboard: bool | None = None
) -> dict:
    """Every piece of a run, as the Trainer's keyword arguments; a checkpoint is restored with
    ``train.auto_resume``. The order is fixed (see the module docstring)."""
    # --stage sr: the super-resolution stage alone, on a frozen base model
    cfg, frozen = stage_config(cfg) if cfg.train.stage == "sr" else (cfg, None)
    tc, clock = cfg.train, PhaseClock()
    runtime = build_runtime(cfg, dist_ctx)
    dist, device = runtime.dist, runtime.device
    seed_everything(tc.seed)
    faults = FaultInjector()
    resume_path, resume = find_resume(tc.checkpoint_dir, tc.auto_resume)
    base = frozen or build_base(cfg, resume_path)
    encoder_id = resume["text_encoder"] if resume else base.text_encoder if base else None
    with clock("data and captions"):  # validation, the cache, caption embeddings
        data = build_data(cfg, encoder_id, progress, runtime)
    saved_args = resume["model_args"] if resume else base.model_args if base else None
    parts, state, plan, steps = build_parts(cfg, runtime, data, saved_args, base)
    model = parts.model
    if not model.panel_memory:
        data.dataset.panel_context = 0
    panels = build_panels(cfg, model.panel_memory and data.dataset.has_sequences() and tc.panel_context > 0)
    if panels.enabled:
        n_seq = sum(j >= 0 for j in data.dataset.prev_indices())
        log.info("Panel sequences: %d images follow a previous panel.", n_seq)
    objective = build_objective(cfg)
    runtime.resources.log_start(cfg.data.resolution, cfg.train.batch_size)
    previous_run = Path()
    if resume is not None:
        state, previous_run = restore(resume, resume_path, state, parts, dist)
        del resume
    state.mark_boundary()
    if dist.enabled:
        parts.ddp_model = ddp_wrap(model, device)
    steps = stage_steps_per_epoch(cfg.sr, len(data.dataset)) if frozen is not None else steps
    policy = CheckpointPolicy.of(tc)
    monitor, run_dir, paths = None, previous_run, model_paths(tc.save_path)
    if dist.is_main:
        run_dir = build_run_folder(cfg, data, parts, state, previous_run, policy)
        show = progress if dashboard is None else dashboard
        with clock("tag model"):  # the folder evaluation's (trained once, then cached)
            monitor = build_monitor(cfg, run_dir, data, objective, device, state.micro_batch, show, paths[0])
        total = tc.epochs * steps
        monitor.set_status(  # for the dashboard's progress and ETA
            epochs=tc.epochs,
            total_steps=min(total, tc.max_steps) if tc.max_steps else total,
            session_start_step=state.global_step,
        )
    state.session_start = time.perf_counter()
    style_db = data.dataset.style_db.to_dict() if cfg.data.extract_style else None
    record = RunRecord(
        cfg.to_dict(),
        data.encoder.encoder_id,
        run_dir,
        cfg.data.data_dir,
        tc.seed,
        style_db,
        training_data_summary(cfg, data),
        hardware_name(device),
        base_record(tc.init_from, base) if tc.init_from else None,
    )
    return {
        "settings": loop_settings(cfg, steps if frozen is not None else 0),
        "state": state,
        "parts": parts,
        "data": data,
        "objective": objective,
        "inputs": build_inputs(cfg, data, panels, parts.model),
        "panels": panels,
        "plan": plan,
        "runtime": runtime,
        "record": record,
        "policy": policy,
        "monitor": monitor,
        "faults": faults,
        "model_paths": paths,
        "progress": progress,
        "clock": clock,
    }
