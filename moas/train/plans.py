"""The run's plans from its resolved config, before anything is allocated: the memory plan (what the step
will take on the accelerator, and the micro-batch / accumulation / checkpointing that fit) for
``moas train --dry-run`` and the start of a CUDA run, and the disk plan (what its checkpoints and model
files will take at their peak).

Everything is built on the meta device, so a 300 M-parameter profile is planned in about a second on a
machine without a GPU.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moas.config import MoasConfig
from moas.data.buckets import make_buckets
from moas.models.discriminator import AnimeStyleDiscriminator
from moas.models.enhance import QualityEnhancer
from moas.models.generator import MoasGenerator
from moas.models.sr_diffusion import SuperResDiffusion
from moas.text import TEXT_WIDTH
from moas.text.encoder import HASH_ID, TextEncoder
from moas.text.inputs import caption_inputs
from moas.train.builders import generator_args
from moas.train.data_setup import model_divisor
from moas.train.disk import DiskPlan, SavePolicy, bytes_of, plan_disk
from moas.train.memory_plan import (
    GB,
    RESERVE_FRACTION,
    MemoryPlan,
    plan_memory,
    state_bytes,
    traced_activation_bytes,
)
from moas.train.saving import milestone_epochs
from moas.train.sr_stage import build_sr_model

# A long caption: the planned text length is the longest the encoder gives.
_PLAN_CAPTION = ", ".join(f"tag{i} word" for i in range(64))


def amp_bytes(cfg: MoasConfig) -> int | None:
    """Bytes per float under the run's autocast on a GPU (None: fp32)."""
    return None if cfg.train.mixed_precision == "no" else 2


def largest_side(cfg: MoasConfig) -> tuple[int, int]:
    """(height, width) of the training bucket with the most pixels."""
    d = cfg.data
    if not d.bucketing:
        return d.resolution, d.resolution
    w, h = max(make_buckets(d.resolution, model_divisor(cfg)), key=lambda wh: wh[0] * wh[1])
    return h, w


def _text(cfg: MoasConfig, batch: int) -> dict[str, torch.Tensor]:
    enc = TextEncoder(require_id=HASH_ID, max_tokens=cfg.text.max_tokens)
    one = caption_inputs(enc, [_PLAN_CAPTION], "cpu")
    return {k: v.expand(batch, *v.shape[1:]).to("meta") for k, v in one.items()}


def _generator_activations(cfg: MoasConfig, model: MoasGenerator, batch: int, ckpt: bool) -> int:
    h, w = largest_side(cfg)
    dtype = next(model.parameters()).dtype  # the activations' dtype: bf16 stands for autocast
    unet = model.unet.unet
    if ckpt:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    model.train()
    x = torch.empty(batch, 3, h, w, device="meta", dtype=dtype)
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    text = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _text(cfg, batch).items()}

    def forward() -> torch.Tensor:
        out = model(x, t, text)
        return out.pred.float().square().mean()

    return traced_activation_bytes(forward)


def _enhancer_activations(cfg: MoasConfig, enhancer: QualityEnhancer, batch: int) -> int:
    side = cfg.data.resolution * cfg.enhance.scale
    dtype = next(enhancer.parameters()).dtype  # bf16 stands for autocast, as for the generator
    lr = torch.empty(batch, 3, side // 2, side // 2, device="meta", dtype=dtype)
    hr = torch.empty(batch, 3, side, side, device="meta", dtype=dtype)

    def forward() -> torch.Tensor:
        up = enhancer.upscale(lr, (side, side), "full")
        full = enhancer.refine(up, "full")
        return (up - hr).square().mean() + (full - hr).square().mean()

    return traced_activation_bytes(forward)


def _sr_activations(cfg: MoasConfig, stage: SuperResDiffusion, batch: int) -> int:
    dtype = next(stage.parameters()).dtype
    x = torch.empty(batch, 3, cfg.sr.crop, cfg.sr.crop, device="meta", dtype=dtype)
    cond = {
        "low": torch.empty_like(x),
        "level": torch.empty(batch, device="meta"),
        "text": torch.empty(batch, TEXT_WIDTH, device="meta", dtype=dtype),
    }
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    stage.train()
    return traced_activation_bytes(lambda: stage(x, t, cond)[0].float().square().mean())


def meta_networks(
    cfg: MoasConfig,
) -> tuple[MoasGenerator, QualityEnhancer | None, AnimeStyleDiscriminator | None, SuperResDiffusion | None]:
    """The networks ``cfg`` trains, on the meta device (shapes only)."""
    with torch.device("meta"):
        generator = MoasGenerator(**generator_args(cfg))
        e = cfg.enhance
        enhancer = QualityEnhancer(e.width, e.sr_channels, e.sr_blocks) if e.train else None
        disc = AnimeStyleDiscriminator(cfg.losses.disc_base_channels) if cfg.losses.adversarial else None
        sr = build_sr_model(cfg.sr) if cfg.sr.train else None
    return generator, enhancer, disc, sr


def disk_plan(cfg: MoasConfig, steps_per_epoch: int = 0) -> DiskPlan:
    """What the run's checkpoints and model files take at their peak (``moas/train/disk.py``)."""
    tc = cfg.train
    policy = SavePolicy.of(tc, milestone_epochs(tc.epochs, tc.milestones), steps_per_epoch)
    generator, enhancer, disc, sr = meta_networks(cfg)
    nets = (bytes_of(generator), bytes_of(enhancer), bytes_of(disc))
    return plan_disk(policy, *nets, amsgrad=tc.amsgrad, sr=bytes_of(sr))


def plan_budget_gb(configured_gb: float, free_gb: float) -> float:
    """The memory the plan may use: ``resources.max_vram_gb`` while what is free when the run starts holds
    the part of it the plan fills (all but its reserve), else what is free (a display on the same card
    holds some, and so may another program)."""
    if free_gb >= configured_gb * (1 - RESERVE_FRACTION):
        return configured_gb
    return round(free_gb, 2)


def memory_plan(cfg: MoasConfig, budget_gb: float | None = None) -> MemoryPlan:
    """The memory plan of ``cfg`` on a GPU with ``budget_gb`` (default ``resources.max_vram_gb``)."""
    tc = cfg.train
    state_model, enhancer, disc, sr = meta_networks(cfg)  # fp32 master weights
    with torch.device("meta"):
        model = MoasGenerator(**generator_args(cfg)).to(torch.bfloat16 if amp_bytes(cfg) else torch.float32)
    side = [m for m in (enhancer, disc, sr) if m is not None]
    state = state_bytes(state_model, side, tc.amsgrad, amp_bytes(cfg))
    if amp_bytes(cfg):  # the side networks run under autocast too
        enhancer = enhancer.to(torch.bfloat16) if enhancer is not None else None
        sr = sr.to(torch.bfloat16) if sr is not None else None
    budget = int((cfg.resources.max_vram_gb if budget_gb is None else budget_gb) * GB)
    return plan_memory(
        budget,
        state,
        lambda m, ckpt: _generator_activations(cfg, model, m, ckpt),
        tc.batch_size,
        tc.grad_accum_steps,
        tc.min_batch_size,
        getattr(tc, "gradient_checkpointing", "auto"),
        (lambda b: _enhancer_activations(cfg, enhancer, b)) if enhancer is not None else None,
        cfg.enhance.batch_size if enhancer is not None else 0,
        (lambda b: _sr_activations(cfg, sr, b)) if sr is not None else None,
        cfg.sr.batch_size if sr is not None else 0,
    )


def apply_memory_plan(cfg: MoasConfig, plan: MemoryPlan) -> MoasConfig:
    """``cfg`` with the plan's micro-batch, accumulation and enhancer batch (the effective batch kept)."""
    train = replace(cfg.train, batch_size=plan.micro_batch, grad_accum_steps=plan.grad_accum)
    if hasattr(train, "gradient_checkpointing"):
        train = replace(train, gradient_checkpointing=plan.checkpointing)
    enhance = replace(cfg.enhance, batch_size=plan.enhance_batch or cfg.enhance.batch_size)
    sr = replace(cfg.sr, batch_size=plan.sr_batch or cfg.sr.batch_size)
    return replace(cfg, train=train, enhance=enhance, sr=sr)
