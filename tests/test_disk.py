"""Disk space: the checkpoint size estimate matches the real files, and a disk too small for one checkpoint
stops training before any work, with one sentence."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from moas.checkpoint import checkpoint_record
from moas.errors import MoasError
from moas.train import disk
from moas.train.loop import build_trainer, train

from .test_resume import tiny

pytestmark = pytest.mark.slow
Usage = namedtuple("Usage", "total used free")


def estimate(trainer) -> tuple[int, int]:
    p = trainer.parts
    side = [m for m in (p.domain.disc, p.domain.enhancer) if m is not None]
    return disk.checkpoint_size_estimate(p.model, side, amsgrad=True)


def test_checkpoint_estimate_matches_the_written_file(tmp_path, demo_dir, caplog):
    caplog.set_level("INFO", logger="moas.train.loop")
    cfg = tiny(tmp_path, demo_dir / "train", max_steps=1)
    trainer = build_trainer(cfg, progress=False)
    full, thinned = estimate(trainer)
    assert "Checkpoints: about" in caplog.text and "GB free in" in caplog.text
    trainer.run()
    (ckpt,) = sorted((tmp_path / "ckpt").glob("checkpoint_*.pt"))
    size = checkpoint_record(ckpt)["size"]
    assert 0.9 * size < full < 1.1 * size, (full, size)
    assert 0.3 * full < thinned < 0.5 * full  # AMSGrad: three moments per weight beside weights + EMA


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


def test_a_disk_that_fits_one_but_not_all_checkpoints_warns(tmp_path, demo_dir, monkeypatch, caplog):
    caplog.set_level("INFO", logger="moas.train.loop")
    real = shutil.disk_usage
    cfg = tiny(tmp_path, demo_dir / "train", max_steps=1)
    probe = build_trainer(cfg, progress=False)
    full, thinned = estimate(probe)
    free = int(full * 1.5)

    def small_disk(path):
        u = real(path)
        return Usage(u.total, u.total - free, free)

    monkeypatch.setattr(disk.shutil, "disk_usage", small_disk)
    caplog.clear()
    tc = cfg.train
    milestones = len(probe.policy.milestones)
    args = (tc.epochs, tc.save_every, tc.keep_last, tc.keep_optimizer_last, milestones)
    disk.check_disk_space(probe.policy.directory, (full, thinned), *args)
    assert "The kept checkpoints may not fit" in caplog.text
