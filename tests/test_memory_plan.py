"""The memory plan: traced activations on known modules, the plan's choices, and the profiles' plans."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moas.cli import main
from moas.config import load_config
from moas.train.memory_plan import (
    BACKWARD_FACTOR,
    GB,
    RESERVE_FRACTION,
    WORKSPACE_BYTES,
    StateBytes,
    plan_memory,
    traced_activation_bytes,
)
from moas.train.plans import apply_memory_plan, memory_plan, plan_budget_gb


def test_trace_counts_what_autograd_keeps():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
        x = torch.empty(32, 64)
    # Linear 1 keeps its input (x); ReLU keeps its output; Linear 2 keeps its input (the same tensor).
    # The weights are state, not activations.
    assert traced_activation_bytes(lambda: net(x).sum()) == (32 * 64 + 32 * 256) * 4
    assert traced_activation_bytes(lambda: net(x.half().float()).sum()) == (32 * 64 + 32 * 256) * 4


def test_attention_is_traced_as_the_fused_kernels_keep_it():
    with torch.device("meta"):
        leaf = torch.empty(2, 4, 1024, 64, requires_grad=True)

    def attend():
        q = leaf * 2.0  # an activation, as in a network (a leaf that requires grad counts as a weight)
        return F.scaled_dot_product_attention(q, q, q).sum()

    kept = traced_activation_bytes(attend)
    # q (= k = v, once), the output and the log-sum-exp — never the 1024² attention matrix.
    assert kept == (2 * 2 * 4 * 1024 * 64 + 2 * 4 * 1024) * 4
    assert kept < 2 * 4 * 1024 * 1024 * 4
    assert F.scaled_dot_product_attention is torch.nn.functional.scaled_dot_product_attention


STATE = StateBytes(weights=GB, grads=GB, optimizer=3 * GB, ema=GB, side=0)  # 6 GB


def per_sample(plain_gb: float, ckpt_gb: float):
    return lambda m, ckpt: int(m * (ckpt_gb if ckpt else plain_gb) * GB)


def usable(budget_gb: float) -> float:
    return budget_gb * (1 - RESERVE_FRACTION)


def test_plan_keeps_the_batch_when_it_fits():
    p = plan_memory(int(30 * GB), STATE, per_sample(1.0, 0.25), 16, 2)
    assert (p.micro_batch, p.grad_accum, p.checkpointing, p.fits) == (16, 2, False, True)
    assert p.step_peak == STATE.total + int(BACKWARD_FACTOR * 16 * GB)


def test_a_large_card_takes_the_effective_batch_in_fewer_micro_batches():
    """On an 80 GB card the profile's 16 × 2 becomes 32 × 1: same effective batch and learning rate."""
    p = plan_memory(int(80 * GB), STATE, per_sample(1.0, 0.25), 16, 2)
    assert (p.micro_batch, p.grad_accum, p.checkpointing, p.fits) == (32, 1, False, True)
    assert "room for micro-batch 32 × 1 (the profile's 16 × 2)" in p.describe()
    cfg = load_config("rtx3060_12gb", use_env=False)
    large = apply_memory_plan(cfg, memory_plan(cfg, 79.4))  # choose_profile's budget for an 80 GB card
    assert large.train.batch_size * large.train.grad_accum_steps == 32 and large.train.grad_accum_steps == 1


def test_plan_lowers_the_micro_batch_and_keeps_the_effective_batch():
    p = plan_memory(int(12 * GB), STATE, per_sample(1.0, 0.25), 16, 2)
    assert p.micro_batch * p.grad_accum == 32 and not p.checkpointing and p.micro_batch == 4
    assert p.peak <= usable(12) * GB and "keeps the effective batch of 32" in p.describe()


def test_plan_turns_on_checkpointing_rather_than_a_tiny_micro_batch():
    p = plan_memory(int(8.5 * GB), STATE, per_sample(1.0, 0.1), 16, 2)
    assert p.checkpointing and p.micro_batch == 16 and p.grad_accum == 2 and p.fits
    forced = plan_memory(int(8.5 * GB), STATE, per_sample(1.0, 0.1), 16, 2, checkpointing=False)
    assert not forced.checkpointing and forced.micro_batch == 1


def test_plan_says_when_nothing_fits_and_halves_the_enhancer_batch():
    p = plan_memory(int(6 * GB), STATE, per_sample(1.0, 0.5), 8, 1)
    assert not p.fits and "DOES NOT FIT" in p.describe()
    q = plan_memory(
        int(12 * GB), STATE, per_sample(0.1, 0.1), 8, 1, enhancer=lambda b: b * GB, enhance_batch=8
    )
    assert q.enhance_batch == 4 and q.enhancer_peak <= usable(12) * GB and q.fits


def test_the_rtx3060_profile_is_planned_under_its_budget():
    cfg = load_config("rtx3060_12gb", use_env=False)
    plan = memory_plan(cfg)
    assert plan.fits and plan.peak <= 11.4 * GB
    assert plan.micro_batch * plan.grad_accum == cfg.train.batch_size * cfg.train.grad_accum_steps
    planned = apply_memory_plan(cfg, plan)
    assert planned.train.batch_size == plan.micro_batch and planned.enhance.batch_size == plan.enhance_batch
    assert plan.state.weights > 0.7 * GB  # the ~200 M-parameter generator, counted on the meta device


def test_the_rtx3060_plan_keeps_ten_percent_of_the_card_free():
    """The autocast-aware plan of the profile on its 12 GB card (11.4 GB budget): at least 10 % headroom and
    the cuBLAS/cuDNN workspace on top of every predicted peak."""
    plan = memory_plan(load_config("rtx3060_12gb", use_env=False))
    assert plan.fits and plan.peak <= 0.9 * 11.4 * GB - WORKSPACE_BYTES


def test_the_trace_keeps_what_cuda_autocast_keeps():
    """GroupNorm → SiLU → conv on bf16: autocast runs the norm in fp32, so the norm keeps an fp32 copy of its
    input and the SiLU its fp32 output (4 bytes each), and the conv keeps the bf16 copy of its input
    (2 bytes): 10 bytes per element, against 6 if everything stayed in bf16."""
    with torch.device("meta"):
        block = torch.nn.Sequential(
            torch.nn.GroupNorm(8, 32), torch.nn.SiLU(), torch.nn.Conv2d(32, 32, 3, padding=1)
        )
        block = block.to(torch.bfloat16)
        x = torch.empty(2, 32, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    n = x.numel()
    kept = traced_activation_bytes(lambda: block(x).float().sum())
    # Beyond the 10 bytes: a few hundred bytes of per-group statistics and fp32 copies of the norm's scale.
    assert 10 * n <= kept <= 10 * n + 1024, (kept, n)


def test_a_card_with_less_free_memory_than_the_budget_is_planned_for_what_is_free():
    assert plan_budget_gb(11.4, 11.9) == 11.4  # a 12 GB card with nothing else on it
    assert plan_budget_gb(11.4, 10.6) == 11.4  # still holds all the plan fills (90 % of the budget)
    assert plan_budget_gb(11.4, 10.0) == 10.0  # the display holds 1.9 GB
    cfg = load_config("rtx3060_12gb", use_env=False)
    tight = memory_plan(cfg, plan_budget_gb(11.4, 9.0))
    assert tight.fits and tight.peak <= 9.0 * GB
    assert tight.micro_batch * tight.grad_accum == cfg.train.batch_size * cfg.train.grad_accum_steps
    assert (tight.micro_batch, tight.checkpointing) != (memory_plan(cfg).micro_batch, False)


def test_dry_run_prints_the_plan(capsys, workdir):
    assert main(["train", "--profile", "rtx3060_12gb", "--dry-run"]) == 0
    out = capsys.readouterr().out
    peak = float(re.search(r"# memory plan: predicted peak ([\d.]+) GB of the 11.4 GB budget", out).group(1))
    assert peak <= 11.4
    disk = re.search(r"# Disk plan: 52 checkpoints over 260 epochs; at most ([\d.]+) GB of checkpoints", out)
    assert float(disk.group(1)) <= 25.0
    assert main(["train", "--profile", "cpu_tiny", "--dry-run"]) == 0
    assert "memory plan: none needed" in capsys.readouterr().out


@pytest.mark.parametrize("ckpt", [False, True])
def test_checkpointing_lowers_traced_activations(ckpt):
    """The trace sees the U-Net's gradient checkpointing: what its blocks keep is recomputed instead."""
    cfg = load_config("rtx3060_12gb", use_env=False)
    from moas.models.generator import MoasGenerator
    from moas.train.builders import generator_args
    from moas.train.plans import _generator_activations  # noqa: PLC0415

    with torch.device("meta"):
        model = MoasGenerator(**generator_args(cfg))
    plain = _generator_activations(cfg, model, 2, False)
    assert (_generator_activations(cfg, model, 2, ckpt) < 0.5 * plain) == ckpt
