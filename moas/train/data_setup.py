"""A run's data, from the config: the training folder (validated and cached), its validation split, the
text encoder and caption bank, the image and caption augmentations, and the monitor that judges training
on them (validation, the folder's own tag model, the best-step keeper). ``moas.train.builders`` builds the
trained networks around it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moas.config import MoasConfig
from moas.data.augment import ImageAugment
from moas.data.captions import CaptionAugment
from moas.data.dataset import ArtDataset
from moas.data.summary import data_summary
from moas.diffusion.objective import DiffusionObjective
from moas.errors import DataError
from moas.eval.best import BestModelKeeper
from moas.eval.folder_score import FolderScorer
from moas.eval.tagger import load_or_train_tagger
from moas.eval.validate import Validator, find_demo_manifest, join_subsets, split_holdout
from moas.inference.prompt_file import read_sample_prompts
from moas.models.generator import MoasGenerator
from moas.monitor.dashboard import Dashboard
from moas.monitor.run_monitor import RunMonitor
from moas.text.bank import TextBank
from moas.text.encoder import TextEncoder
from moas.train.parts import Runtime, TrainingData

log = logging.getLogger("moas.train.loop")


def training_data_summary(cfg: MoasConfig, data: TrainingData) -> dict:
    """The model card's data section: the training images, and how many were held out of the folder."""
    ds = data.dataset
    held_out = len(data.val_set) if data.val_set is not None and not cfg.data.val_dir else 0
    return data_summary(ds.paths, data.captions, ds.root, held_out)


def model_divisor(cfg: MoasConfig) -> int:
    """Image sides must be divisible by this for the U-Net: patch_size * 2**(levels - 1)."""
    return cfg.model.patch_size * 2 ** (len(cfg.model.block_channels) - 1)


def build_dataset(cfg: MoasConfig, folder: str, encoder=None, progress: bool = True) -> ArtDataset:
    """A validated dataset of ``folder`` (the cache is built on the way)."""
    d = cfg.data
    ds = ArtDataset(
        folder,
        d.resolution,
        d.cache_dir,
        bucketing=d.bucketing,
        divisor=model_divisor(cfg),
        max_aspect=d.bucket_max_aspect,
        extract_style=d.extract_style,
        ram_cache_bytes=int(d.ram_cache_gb * 2**30),
        hr_margin=d.augment_margin if d.augment > 0 else 0.0,
        captions_from_names=d.captions_from_names,
        small_images=d.small_images,
        # Previous panels only matter to a model with panel memory (moas.models.panel_memory).
        panel_context=cfg.train.panel_context
        if cfg.brain.conditioning == "moas" and cfg.brain.panel_memory
        else 0,
    )
    ds.validate(d.max_bad_fraction, progress=progress, report_dir=cfg.train.log_dir, encoder=encoder)
    return ds


def image_augment(cfg: MoasConfig, model: MoasGenerator | None = None) -> ImageAugment:
    """The run's image augmentation; off, with a warning, for a model built without its conditioning input
    (a resume or fine-tune of one trained without augmentation), since unconditioned augmentation leaks."""
    d = cfg.data
    aug = ImageAugment(
        probability=d.augment,
        flip=d.augment_flip,
        max_zoom=d.augment_max_zoom,
        max_rotation=d.augment_max_rotation,
        color=d.augment_color,
        margin=d.augment_margin,
    )
    if aug.active and model is not None and not model.init_args.get("augment_dim"):
        log.warning(
            "data.augment is on, but this model was first trained without image augmentation and has no "
            "input for it; training on without augmentation."
        )
        return ImageAugment()
    return aug


def caption_augment(cfg: MoasConfig) -> CaptionAugment:
    d = cfg.data
    return CaptionAugment(d.keep_tokens, d.shuffle_tags, d.tag_dropout, d.caption_dropout)


def build_data(cfg: MoasConfig, encoder_id: str | None, progress: bool, runtime: Runtime) -> TrainingData:
    """Text encoder (first: validation can embed captions with it; ``encoder_id``: the one a checkpoint or
    base model was trained with), dataset, validation set, text bank."""
    encoder = TextEncoder(cfg.text.model_name, max_tokens=cfg.text.max_tokens, require_id=encoder_id)
    dataset = build_dataset(cfg, cfg.data.data_dir, encoder, progress)
    log.info(
        "Data: %d images in %s (%d skipped); device %s, %d threads.",
        len(dataset),
        cfg.data.data_dir,
        len(dataset.skipped),
        runtime.device,
        runtime.threads,
    )
    val_set = None
    if cfg.data.val_dir:
        val_set = build_dataset(cfg, cfg.data.val_dir, encoder, progress)
        log.info("Validation: %d images in %s.", len(val_set), cfg.data.val_dir)
    else:  # hold out a seed-fixed slice of the training folder (excluded from training)
        dataset, val_set = split_holdout(
            dataset, cfg.monitor.val_fraction, cfg.train.seed, cfg.monitor.val_min_images
        )
        if val_set is not None:
            log.info("Validation: %d images held out of %s.", len(val_set), cfg.data.data_dir)
    captions = dataset.captions()
    val_captions = val_set.captions() if val_set else []
    bank = TextBank(encoder, captions + val_captions, progress=progress)
    return TrainingData(encoder, dataset, val_set, captions, bank)


def build_folder_scorer(cfg: MoasConfig, data: TrainingData, progress: bool) -> FolderScorer | None:
    """The checkpoint scorer on the training folder's own tag model; None (with the reason logged) when
    switched off or when the captions cannot train a tag model."""
    mc = cfg.monitor
    if not mc.folder_eval or not mc.select_best:
        return None
    if data.val_set is not None and not cfg.data.val_dir:
        joined, train_idx, heldout_idx = join_subsets(data.dataset, data.val_set)
    else:  # nothing held out of the folder (or a separate --val_dir): prompt with the training captions
        joined, train_idx = data.dataset, list(range(len(data.dataset)))
        heldout_idx = train_idx
    try:
        tagger = load_or_train_tagger(
            joined, seed=cfg.train.seed, progress=progress, max_steps=mc.tagger_steps
        )
    except DataError as e:
        log.info("Folder eval off: %s", e)
        return None
    return FolderScorer(joined, tagger, heldout_idx, train_idx, mc.folder_eval_n, cfg.train.seed)


def build_monitor(
    cfg: MoasConfig,
    run_dir: Path,
    data: TrainingData,
    objective: DiffusionObjective,
    device: torch.device,
    batch_size: int,
    progress: bool,
    model_path: Path,
) -> RunMonitor:
    """The run's monitor with its validator (held-out/--val_dir images, demo eval) and best-model keeper."""
    mc = cfg.monitor
    prompts = read_sample_prompts(mc.sample_prompts) if mc.sample_prompts else None
    manifest = find_demo_manifest(cfg.data.data_dir)
    validator = Validator(
        data.val_set,
        data.bank,
        objective,
        device,
        cfg.train.seed,
        batch_size,
        caption_pool=list(data.bank.entries),
        demo_dir=manifest.parent if manifest else None,
        diffusion=cfg.diffusion,
        sample=cfg.sample,
        eval_n=mc.eval_n,
        folder=build_folder_scorer(cfg, data, progress),
    )
    keeper = BestModelKeeper(run_dir, model_path, mc.memorisation_limit) if mc.select_best else None
    dashboard = Dashboard(interval_s=mc.dashboard_every_s, enabled=progress and mc.dashboard)
    return RunMonitor(
        run_dir,
        cfg.to_toml(),
        data.captions,
        data.encoder,
        sample=cfg.sample,
        diffusion=cfg.diffusion,
        creativity_samples=mc.creativity_samples,
        sample_prompts=prompts,
        validator=validator,
        keeper=keeper,
        dashboard=dashboard,
        measure_every=mc.measure_every,
        device=device,
    )
