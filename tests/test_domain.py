"""Training integration: domain losses on x0, discriminator and enhancer steps, the cascade through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moas.cli import main
from moas.config import load_config
from moas.data.dataset import ArtDataset, to_model_range
from moas.diffusion.schedule import NoiseSchedule, make_train_scheduler
from moas.inference.model_file import read_model_file
from moas.train.builders import build_side_networks

from .conftest import TINY_CONFIG

ON = {"losses": {"domain": True, "adversarial": True, "disc_warmup_steps": 1}}


def test_domain_training_parts(demo_dir, tmp_path):
    cfg = load_config(
        config_file=TINY_CONFIG, overrides={**ON, "data": {"cache_dir": str(tmp_path)}}, use_env=False
    )
    ds = ArtDataset(demo_dir / "train", cfg.data.resolution, cfg.data.cache_dir)
    ds.validate(progress=False)
    dom = build_side_networks(cfg, ds, torch.device("cpu"))
    sched = NoiseSchedule(make_train_scheduler(cfg.diffusion), "v_prediction", 5.0)
    x0 = to_model_range(torch.stack([ds[i]["pixels"] for i in range(4)]))  # (4, 3, 16, 16)
    t = torch.tensor([10, 200, 500, 990])
    noise = torch.randn_like(x0)
    x_t = sched.add_noise(x0, noise, t)
    pred = (sched.target(x0, noise, t) + 0.1 * torch.randn_like(x0)).requires_grad_(True)

    assert dom.uses_x0
    x0_pred = sched.predict_x0(x_t, pred, t)  # (4, 3, 16, 16), with its graph
    extra, logs = dom.generator_loss(x0, x0_pred, t, sched, global_step=0)
    assert "loss/gan" not in logs  # the discriminator is still warming up
    extra, logs = dom.generator_loss(x0, x0_pred, t, sched, global_step=5)
    assert {
        "loss/pixel",
        "loss/ssim",
        "loss/line_art",
        "loss/color",
        "loss/style",
        "loss/anatomy",
        "loss/gan",
    } <= set(logs)
    assert torch.isfinite(extra) and extra > 0
    extra.backward()
    assert pred.grad.abs().sum() > 0
    # low-noise samples dominate: the t=990 sample's x0 gradient is tiny next to the t=10 one
    g = pred.grad.abs().flatten(1).sum(1)
    assert g[0] > 10 * g[3]

    x0_pred = x0_pred.detach()
    out = dom.after_step(x0, x0_pred, global_step=5)
    assert {"disc/loss", "enhance/loss", "enhance/sr_x2"} <= set(out)
    assert dom.disc_net.steps == 1 and dom.enh_net.steps == 1
    out = dom.after_step(x0, x0_pred, global_step=6)
    assert "enhance/sr_x4" in out  # ×2 and ×4 pairs alternate

    state = dom.state_dict()
    fresh = build_side_networks(cfg, ds, torch.device("cpu"))
    fresh.load_state_dict(state)
    for a, b in zip(fresh.enhancer.state_dict().values(), dom.enhancer.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh.enh_net.steps == 2 and fresh.disc_net.steps == 2


def test_losses_off_by_default_costs_nothing(demo_dir, tmp_path):
    cfg = load_config(config_file=TINY_CONFIG, overrides={"enhance": {"train": False}}, use_env=False)
    ds = ArtDataset(demo_dir / "train", cfg.data.resolution, str(tmp_path))
    dom = build_side_networks(cfg, ds, torch.device("cpu"))
    x = torch.zeros(2, 3, 16, 16)
    assert not dom.uses_x0  # the step computes no predicted x0 for it
    assert dom.generator_loss(x, x, torch.tensor([1, 2]), None, 0) == (None, {})
    assert dom.after_step(x, None, 1) == {} and dom.enhancer is None


@pytest.mark.slow
def test_train_generate_edit_cascade_cli(demo_dir, workdir, capsys):
    cfg = workdir / "on.toml"
    cfg.write_text(
        TINY_CONFIG.read_text() + "\n[losses]\ndomain = true\nadversarial = true\ndisc_warmup_steps = 1\n"
    )
    args = [
        "train",
        "--config",
        str(cfg),
        "--data_dir",
        str(demo_dir / "train"),
        "--max_steps",
        "4",
        "--quiet",
    ]
    assert main(args) == 0
    mf = read_model_file(workdir / "models" / "best_model.safetensors")
    assert mf.enhancer_args is not None and mf.enhancer_weights
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next((workdir / "runs").iterdir())))
    ea.Reload()
    assert {"loss/ssim", "loss/line_art", "loss/gan", "disc/loss", "enhance/loss"} <= set(
        ea.Tags()["scalars"]
    )

    base = [
        "generate",
        "--prompt",
        "1girl, red hair",
        "--steps",
        "2",
        "--quiet",
        "--width",
        "40",
        "--height",
        "40",  # a square: this model was trained without aspect buckets
    ]
    assert main([*base, "--output", "sr.png", "--quality_enhance", "resolution"]) == 0
    assert main([*base, "--output", "bic.png", "--quality_enhance", "none"]) == 0
    sr, bic = np.asarray(Image.open("sr.png")), np.asarray(Image.open("bic.png"))
    assert sr.shape == bic.shape == (40, 40, 3)
    assert not np.array_equal(sr, bic)  # the trained SR stage is not bicubic any more

    img = np.asarray(Image.open(next((demo_dir / "train").rglob("*.png"))).convert("RGB"))
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save("mask.png")
    Image.fromarray(img).save("in.png")
    capsys.readouterr()
    edit = ["edit", "--image", "in.png", "--prompt", "forest", "--steps", "2", "--resample", "1", "--quiet"]
    assert main([*edit, "--mask", "mask.png", "--output", "e.png"]) == 0
    assert "kept pixels identical: yes" in capsys.readouterr().out
    assert main([*edit, "--outpaint", "8,8,0,0", "--output", "w.png"]) == 0
    assert "seam overlap MSE" in capsys.readouterr().out
    assert Image.open("w.png").size == (img.shape[1] + 16, img.shape[0])
    assert main([*edit, "--output", "n.png"]) != 0  # neither a mask nor margins
    assert "Give --mask" in capsys.readouterr().err
