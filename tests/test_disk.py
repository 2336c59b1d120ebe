"""Disk space: the disk plan against the files a real run writes, the weights-only checkpoints the run
leaves (never resumed, still a model), the rtx3060_12gb plan from its parameter counts, and a disk too small
for one checkpoint stopping training before any work, with one sentence."""

from __future__ import annotations

import shutil
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from moas.checkpoint import checkpoint_record, load_checkpoint, rewrite_checkpoint, verify_checkpoint
from moas.cli import main
from moas.config import MoasConfig, load_config, read_toml
from moas.errors import ConfigError, MoasError
from moas.inference.model_file import load_generator, read_model_file
from moas.models.discriminator import AnimeStyleDiscriminator
from moas.models.enhance import QualityEnhancer
from moas.models.generator import MoasGenerator
from moas.train import disk
from moas.train.builders import generator_args
from moas.train.loop import train
from moas.train.rotation import contents_of, find_latest_checkpoint, reduced_state
from moas.train.saving import milestone_epochs
from moas.train.sr_stage import build_sr_model

from .conftest import TINY_CONFIG, module_tmp, tiny

Usage = namedtuple("Usage", "total used free")
# One epoch of 4 optimizer steps (16 images, micro-batch 4), a checkpoint every 2 steps, an injected
# out-of-memory error at the second micro-batch (an emergency checkpoint at step 1, then micro-batch 2 × 2).
POLICY = {"save_every_steps": 2, "keep_last": 1, "keep_optimizer_last": 1, "old_checkpoint": "ema_bf16"}
STEPS_PER_EPOCH = 4


def meta_networks(cfg: MoasConfig) -> tuple[disk.NetBytes, disk.NetBytes, disk.NetBytes]:
    """The sizes of the networks ``cfg`` trains, counted on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        generator = MoasGenerator(**generator_args(cfg))
        e = cfg.enhance
        enhancer = QualityEnhancer(e.width, e.sr_channels, e.sr_blocks) if e.train else None
        disc = AnimeStyleDiscriminator(cfg.losses.disc_base_channels) if cfg.losses.adversarial else None
    return disk.bytes_of(generator), disk.bytes_of(enhancer), disk.bytes_of(disc)


def sr_stage(cfg: MoasConfig) -> disk.NetBytes:
    """The super-resolution stage's sizes when ``cfg`` trains one."""
    if not cfg.sr.train:
        return disk.NO_NET
    with torch.device("meta"):
        return disk.bytes_of(build_sr_model(cfg.sr))


def plan_for(cfg: MoasConfig, steps_per_epoch: int = 0) -> disk.DiskPlan:
    tc = cfg.train
    policy = disk.SavePolicy.of(tc, milestone_epochs(tc.epochs, tc.milestones), steps_per_epoch)
    return disk.plan_disk(policy, *meta_networks(cfg), amsgrad=tc.amsgrad, sr=sr_stage(cfg))


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory):
    """make-data + a one-epoch tiny run through the CLI with the policy above; (folder, its config)."""
    with module_tmp(tmp_path_factory, "disk") as root:
        with pytest.MonkeyPatch.context() as mp:  # undone before the tests run
            mp.chdir(root)
            for key, value in POLICY.items():
                mp.setenv(f"MOAS_TRAIN_{key.upper()}", str(value))
            mp.setenv("MOAS_TRAIN_SAMPLE_EVERY", "0")
            mp.setenv("MOAS_INJECT", "oom@2")
            data = ["make-data", "--out", "data/demo", "--n_images", "16", "--size", "32", "--seed", "1"]
            assert main(data) == 0
            args = ["train", "--config", str(TINY_CONFIG), "--data_dir", "data/demo/train", "--epochs", "1"]
            assert main([*args, "--quiet"]) == 0
        cfg = MoasConfig.from_dict(read_toml(next((root / "runs").iterdir()) / "config.toml"))
        yield root, cfg


@pytest.mark.slow
def test_the_plan_predicts_the_files_a_run_writes(policy_run, tmp_path):
    root, cfg = policy_run
    assert {k: getattr(cfg.train, k) for k in POLICY} == POLICY
    plan = plan_for(cfg, STEPS_PER_EPOCH)
    ckpt = root / "checkpoints"
    records = {p.name: checkpoint_record(p) for p in ckpt.glob("*.pt")}
    # Step 2 rotated away; step 4 and the emergency checkpoint of step 1 reduced once saved past.
    assert {n: contents_of(r) for n, r in records.items()} == {
        "epoch_0001.pt": "full",
        "checkpoint_00000004.pt": "ema_bf16",
        "emergency_oom_epoch_0001.pt": "ema_bf16",
    }
    assert "emergency checkpoint" in (root / "logs" / "error.log").read_text()
    assert (plan.saves, plan.end_full, plan.end_old) == (3, 1, 1)
    # Keeping one full checkpoint, the emergency one of step 1 stood beside it until step 2 was saved.
    assert (plan.peak_full, plan.peak_old, plan.emergency_full, plan.emergency_old) == (2, 1, 1, 1)
    full, ema = records["epoch_0001.pt"]["size"], records["checkpoint_00000004.pt"]["size"]
    # Upper bounds: trainable weights that get no gradient in a run (unused experts) have no AdamW state.
    assert 0.98 * full < plan.sizes.full < 1.06 * full, (plan.sizes.full, full)
    assert 0.99 * ema < plan.sizes.ema_bf16 < 1.02 * ema, (plan.sizes.ema_bf16, ema)
    for name in ("best_model.safetensors", "last_model.safetensors"):
        size = (root / "models" / name).stat().st_size
        assert 0.99 * size < plan.sizes.model_file < 1.02 * size, (name, plan.sizes.model_file, size)
    thinned = shutil.copy(ckpt / "epoch_0001.pt", tmp_path / "epoch_0001.pt")
    shutil.copy(ckpt / "epoch_0001.pt.json", tmp_path / "epoch_0001.pt.json")
    rewrite_checkpoint(thinned, lambda s: reduced_state(s, "thinned"), {"contents": "thinned"})
    size = Path(thinned).stat().st_size
    assert 0.99 * size < plan.sizes.thinned < 1.02 * size, (plan.sizes.thinned, size)
    assert plan.end_bytes == plan.sizes.full + plan.sizes.ema_bf16
    text = plan.describe()
    assert "full (resumable)" in text and "ema_bf16 (weights only)" in text and "model files" in text


@pytest.mark.slow
def test_a_weights_only_checkpoint_never_resumes_but_generates(policy_run, monkeypatch):
    root, _cfg = policy_run
    ckpt = root / "checkpoints"
    reduced = ckpt / "checkpoint_00000004.pt"
    assert verify_checkpoint(reduced)
    state = load_checkpoint(reduced)
    assert state["resumable"] is False and "optimizer" not in state and "model" not in state
    assert {t.dtype for t in state["ema"]["model"].values()} <= {torch.bfloat16, torch.float64, torch.int64}
    assert find_latest_checkpoint(ckpt).name == "epoch_0001.pt"
    mf = read_model_file(reduced)
    assert mf.enhancer_weights is not None and mf.provenance["global_step"] == 4
    model = load_generator(mf, reduced)
    saved = state["ema"]["model"]
    full_ema = load_checkpoint(ckpt / "epoch_0001.pt")["ema"]["model"]  # the same step's EMA, float32
    for name, value in model.state_dict().items():
        assert value.dtype == full_ema[name].dtype and torch.equal(value, saved[name].to(value.dtype)), name
    for name, value in model.named_parameters():  # bf16 keeps 8 bits of mantissa
        assert torch.allclose(value, full_ema[name], rtol=1e-2, atol=1e-6), name
    monkeypatch.chdir(root)
    out = ["--output", "w.png", "--steps", "2", "--seed", "1", "--quiet"]
    assert main(["generate", "--model", str(reduced), "--prompt", "1girl, red hair", *out]) == 0
    assert Image.open("w.png").size == (16, 16)


def test_the_rtx3060_12gb_run_fits_in_25_gb_of_checkpoints():
    cfg = load_config("rtx3060_12gb")
    tc = cfg.train
    assert (tc.epochs, tc.keep_optimizer_last, tc.old_checkpoint) == (260, 2, "ema_bf16")
    generator, enhancer, disc = meta_networks(cfg)
    assert 195e6 < generator.state / 4 < 210e6  # ~200 M parameters (the brain at half the original's widths)
    plan = plan_for(cfg)
    assert plan.checkpoint_bytes <= 25e9, plan.describe()
    # The newest 2 + the one being written; an emergency checkpoint adds one bf16 file at most.
    assert (plan.peak_full, plan.emergency_full, plan.emergency_old) == (3, 0, 1)
    assert 4.0e9 < plan.sizes.full < 4.4e9 and 0.4e9 < plan.sizes.ema_bf16 < 0.5e9
    # Before this policy (3 full, older ones thinned): about 74 GB (108 GB with the original's brain widths).
    old = replace(plan.policy, keep_last=30, keep_optimizer_last=3, old_checkpoint="thinned")
    assert disk.plan_disk(old, generator, enhancer, disc).checkpoint_bytes > 70e9
    # The same arithmetic from parameter counts alone.
    rough = disk.plan_disk(plan.policy, disk.NetBytes.fp32(203_000_000), disk.NetBytes.fp32(7_900_000))
    assert abs(rough.checkpoint_bytes - plan.checkpoint_bytes) < 0.02 * plan.checkpoint_bytes


def test_the_small_profiles_keep_their_policy():
    # The demo keeps one checkpoint (the best step is already in the model file); the tests keep 30.
    for cfg, keep in ((load_config("cpu_tiny"), 1), (load_config(None, TINY_CONFIG, use_env=False), 30)):
        tc = cfg.train
        assert (tc.keep_last, tc.keep_optimizer_last, tc.old_checkpoint, tc.keep_emergency) == (
            keep,
            3,
            "thinned",
            2,
        )


def test_replay_follows_rotation_and_reduction():
    ms = frozenset(milestone_epochs(260))
    p = disk.SavePolicy(260, 5, keep_last=4, keep_optimizer_last=2, old_checkpoint="ema_bf16", milestones=ms)
    sizes = disk.FileSizes(full=100, thinned=40, ema_bf16=10, model_file=20)
    # At the last save: 250, 255 and 260 full; 235-245 and the six earlier milestones reduced (the oldest
    # non-milestone is deleted first, then 250 is rewritten beside itself).
    assert disk.replay(p, sizes) == ((3, 9), (2, 9), 52)
    full = disk.SavePolicy(260, 5, keep_last=4, old_checkpoint="full", milestones=ms)
    assert disk.replay(full, sizes) == ((11, 0), (11, 0), 52)
    steps = disk.SavePolicy(2, 1, keep_last=3, keep_optimizer_last=1, save_every_steps=2, steps_per_epoch=5)
    assert disk.save_sequence(steps) == [("step", False), ("step", False), ("epoch", False)] + [
        ("step", False),
        ("step", False),
        ("step", False),
        ("epoch", False),
    ]
    unknown = disk.plan_disk(disk.SavePolicy(2, 1, keep_last=3, save_every_steps=2), disk.NetBytes.fp32(1000))
    assert (
        unknown.peak_old
        == disk.plan_disk(disk.SavePolicy(2, 1, keep_last=3), disk.NetBytes.fp32(1000)).peak_old + 3
    )


@pytest.mark.parametrize(
    "override, words",
    [
        ({"old_checkpoint": "bf16"}, "train.old_checkpoint must be full, thinned or ema_bf16"),
        ({"keep_emergency": -1}, "train.keep_emergency must be 0 or more"),
    ],
)
def test_bad_policy_values_are_one_sentence(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config("cpu_tiny", overrides={"train": override}, use_env=False)


@pytest.mark.slow
def test_a_disk_too_small_for_one_checkpoint_stops_before_training(tmp_path, demo_dir, monkeypatch):
    real = shutil.disk_usage

    def tiny_disk(path):
        u = real(path)
        return Usage(u.total, u.total - 10_000_000, 10_000_000)  # 10 MB free

    monkeypatch.setattr(disk.shutil, "disk_usage", tiny_disk)
    with pytest.raises(MoasError, match=r"Only 0\.01 GB is free in .* one checkpoint needs about"):
        train(tiny(tmp_path, demo_dir / "train", max_steps=1), progress=False)
    assert not list((tmp_path / "ckpt").glob("*.pt"))
    assert not (tmp_path / "runs").exists()  # stopped before the run folder was made


def test_a_disk_that_fits_one_but_not_all_checkpoints_warns(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="moas.train.loop")
    policy = disk.SavePolicy(12, 5, milestones=frozenset(milestone_epochs(12)))
    plan = disk.plan_disk(policy, disk.NetBytes.fp32(10_000_000))
    real = shutil.disk_usage
    free = int(plan.sizes.full * 1.5)

    def small_disk(path):
        u = real(path)
        return Usage(u.total, u.total - free, free)

    monkeypatch.setattr(disk.shutil, "disk_usage", small_disk)
    disk.check_disk_space(tmp_path / "ckpt", plan)
    assert "Checkpoints: about" in caplog.text and "GB free in" in caplog.text
    assert "The kept checkpoints may not fit" in caplog.text


def test_the_size_estimate_is_the_plans():
    model, enhancer = torch.nn.Linear(10, 10), torch.nn.Conv2d(3, 3, 3)
    full, thinned = disk.checkpoint_size_estimate(model, [enhancer], amsgrad=True)
    sizes = disk.file_sizes(disk.bytes_of(model), disk.bytes_of(enhancer))
    assert (full, thinned) == (sizes.full, sizes.thinned)
    assert sizes.full - sizes.thinned == 3 * 4 * (110 + 84) + 4 * 4 + disk.TENSOR_OVERHEAD * 4 * 4
