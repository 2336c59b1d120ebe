"""Unit tests: PSNR/SSIM, the expert/art-theory measurements, ValidationMetrics, the quality expert,
sample-prompt files, the progress chart and the dashboard text, the hold-out split and best-step keeper."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from moas.errors import ConfigError
from moas.eval.metrics import MEASURES, ValidationMetrics, art_measurements, psnr, ssim
from moas.eval.quality import creativity, quality_parts, quality_score
from moas.inference.prompt_file import read_sample_prompts
from moas.monitor.progress import PANELS, TrainingHistory, visualize_training_progress


def smooth_images(b: int = 2, size: int = 32) -> torch.Tensor:
    """Structured test images in [-1, 1]: colour gradients with a bright disc."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((x**2 + y**2) < 0.3).float()
    img = torch.stack([x, y, disc * 2 - 1])  # (3, H, W)
    return torch.stack([img * (1 - 0.2 * i) for i in range(b)])  # (B, 3, H, W)


def test_psnr_matches_definition_and_caps_identical():
    a = torch.zeros(1, 3, 8, 8)
    b = torch.full((1, 3, 8, 8), 0.2)  # 0.1 apart in [0, 1] → mse 0.01 → 20 dB
    assert psnr(b, a).item() == pytest.approx(20.0, abs=1e-4)
    assert psnr(a, a).item() == 100.0


def test_ssim_is_one_for_identical_and_drops_with_noise():
    x = smooth_images()
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    noisy = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)
    s = ssim(noisy, x)
    assert (s < 0.8).all() and (s > -1).all()
    assert ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)).item() == pytest.approx(1.0)


def test_art_measurements_zero_on_identical_positive_on_change():
    x = smooth_images()
    same = art_measurements(x, x)
    assert set(same) == {
        "expert/line_art",
        "expert/color",
        "expert/background",
        "art_theory/anatomy",
        "art_theory/perspective",
        "art_theory/color_harmony",
    }
    assert all(abs(v) < 1e-6 for v in same.values())
    changed = torch.cat([x[:, 1:], x[:, :1]], 1).flip(-2)  # swapped colours, flipped vertically
    changed[..., :, :8] = -1  # a dark band on the left: breaks symmetry
    diff = art_measurements(changed, x)
    assert all(v > 0 for v in diff.values()), diff
    # the measurements respond to what they are named for
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert MEASURES["line_art"](blurred, x).mean() > 0
    assert MEASURES["background"](blurred, x).mean() < MEASURES["background"](changed, x).mean()


def test_validation_metrics_rolling_window():
    vm = ValidationMetrics(maxlen=1000)
    assert vm.latest("psnr") is None and vm.average("ssim") is None
    for i in range(1500):
        vm.update(psnr=float(i), accuracy=None)
    assert len(vm.history["psnr"]) == 1000 and vm.latest("psnr") == 1499.0
    assert vm.average("psnr") == pytest.approx(sum(range(500, 1500)) / 1000)
    assert vm.latest("accuracy") is None
    vm.update(ssim=0.5, psnr=float("nan"))
    assert vm.summary()["ssim"] == {"latest": 0.5, "average": 0.5, "count": 1}
    restored = ValidationMetrics()
    restored.load_state_dict(vm.state_dict())
    assert restored.average("psnr") == vm.average("psnr")


def test_quality_score_prefers_clean_structured_images():
    clean = smooth_images(1, 32)
    noise = torch.rand(1, 3, 32, 32) * 2 - 1
    flat = torch.zeros(1, 3, 32, 32)
    q = quality_score(torch.cat([clean, noise, flat]))
    assert q.shape == (3,) and ((q >= 0) & (q <= 1)).all()
    assert q[0] > q[1] and q[0] > q[2]
    parts = quality_parts(torch.cat([clean, noise]))
    assert parts["clean_detail"][0] > parts["clean_detail"][1]
    u8 = ((clean.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert quality_score(u8).item() == pytest.approx(q[0].item(), abs=0.02)


def test_creativity_zero_for_copies_and_grows_with_difference():
    x = smooth_images(1)
    assert creativity(torch.cat([x, x, x])) == pytest.approx(0.0, abs=1e-6)
    small = creativity(torch.cat([x, x * 0.9]))
    large = creativity(torch.cat([x, -x]))
    assert 0 < small < large <= 1
    with pytest.raises(ValueError):
        creativity(x)


def test_sample_prompts_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text(
        "# comment\n1girl, red hair, forest --seed 3\n\n1girl, (smile), city --steps 7 --scale 4.5\nplain\n"
    )
    ps = read_sample_prompts(f)
    assert [p.prompt for p in ps] == ["1girl, red hair, forest", "1girl, (smile), city", "plain"]
    assert (ps[0].seed, ps[1].steps, ps[1].scale, ps[2].seed) == (3, 7, 4.5, None)
    f.write_text("ok prompt\n1girl --steps many\n")
    with pytest.raises(ConfigError, match=r"line 2: --steps has an invalid value 'many'"):
        read_sample_prompts(f)
    f.write_text("1girl --sed 4\n")
    with pytest.raises(ConfigError, match=r"line 1: unknown option --sed"):
        read_sample_prompts(f)
    f.write_text("--seed 4\n")
    with pytest.raises(ConfigError, match="line 1: the line has options but no prompt"):
        read_sample_prompts(f)
    with pytest.raises(ConfigError, match="does not exist"):
        read_sample_prompts(tmp_path / "missing.txt")


def test_progress_chart_has_nine_panels(tmp_path):
    h = TrainingHistory()
    for step in range(1, 40):
        h.add(step, "loss/total", 1.0 / step)
        h.add(step, "lr", 1e-3)
        h.add(step, "expert/line_art", 0.1 + step * 1e-3)
    h.add(10, "val/psnr", 12.0)
    h.add(20, "val/psnr", 14.0)
    h.status.update(epoch=2, epochs=3, step=39)
    axes = visualize_training_progress(h, tmp_path / "progress.png")
    assert len(axes) == 9 == len(PANELS)
    assert [ax.get_title() for ax in axes] == [p[0] for p in PANELS]
    assert len(axes[0].get_lines()) == 1 and len(axes[6].get_lines()) == 1  # loss, PSNR drawn
    assert len(axes[7].get_lines()) == 0  # no SSIM yet: a "no data yet" panel
    img = Image.open(tmp_path / "progress.png")
    img.load()
    assert img.size[0] > 500 and np.asarray(img.convert("L")).std() > 5

    class System:  # any object with a .history works
        history = h

    assert len(visualize_training_progress(System(), tmp_path / "p2.png")) == 9
    with pytest.raises(TypeError):
        visualize_training_progress(object(), tmp_path / "p3.png")


def test_dashboard_text_and_plain_lines(tmp_path):
    import io

    from moas.monitor.dashboard import Dashboard, print_progress_dashboard, render_dashboard

    h = TrainingHistory()
    h.status.update(epoch=3, epochs=10, step=30, total_steps=100, session_start_step=0)
    h.status["session_started"] = h.status["started"] - 30  # 1 s per step → 70 s left
    h.add(30, "loss/total", 0.25)
    h.add(30, "loss/diffusion", 0.2)
    h.add(30, "lr/0", 1e-4)
    h.add(30, "perf/images_per_sec", 12.5)
    h.add(30, "system/ram_gb", 1.5)
    h.status.update(best_score=0.75, best_metric="demo_accuracy", best_epoch=2)
    lines = render_dashboard(h)
    text = "\n".join(lines)
    assert "epoch 3/10" in text and "step 30/100" in text and "ETA 00:01:10" in text
    assert "loss 0.25 (diffusion 0.2)" in text and "lr 1.00e-04" in text and "12.5 img/s" in text
    assert "RAM 1.50 GB" in text and "best demo_accuracy 0.7500 @ epoch 2" in text
    buf = io.StringIO()  # not a terminal: plain lines, throttled unless forced
    dash = Dashboard(buf, interval_s=3600)
    dash.show(h, force=True)
    dash.show(h)
    out = buf.getvalue()
    assert out.count("[dashboard] epoch 3/10") == 1 and "\x1b" not in out and "\r" not in out
    buf2 = io.StringIO()
    print_progress_dashboard(h, file=buf2)
    assert buf2.getvalue().startswith("[dashboard] epoch 3/10")


def test_split_holdout_is_fixed_by_seed_and_disjoint(demo_dir):
    from moas.data.dataset import ArtDataset
    from moas.eval.validate import split_holdout

    ds = ArtDataset(demo_dir / "train", 16, None)
    tr, va = split_holdout(ds, 0.2, seed=5, min_images=20)
    assert len(va) == round(0.2 * 24) and len(tr) + len(va) == 24
    assert not set(tr.paths) & set(va.paths)
    tr2, va2 = split_holdout(ArtDataset(demo_dir / "train", 16, None), 0.2, seed=5, min_images=20)
    assert va2.paths == va.paths
    assert split_holdout(ds, 0.2, seed=6, min_images=20)[1].paths != va.paths
    assert split_holdout(ds, 0.05, seed=5, min_images=30)[1] is None  # too small a folder
    assert len(split_holdout(ds, 0.01, seed=5, min_images=20)[1]) == 1  # at least one image


def test_best_model_keeper_keeps_highest_score(tmp_path):
    from moas.eval.best import BestModelKeeper, model_quality_score
    from moas.inference.model_file import ModelFile, read_model_file

    assert model_quality_score({"demo_accuracy": None, "prompt_adherence": 0.6, "ssim": 0.3}) == (
        0.6,
        "prompt_adherence",
    )
    assert model_quality_score({"loss": 0.1}) == (None, None)
    keeper = BestModelKeeper(tmp_path / "run", tmp_path / "models" / "best_model.safetensors")
    (tmp_path / "run").mkdir()

    def model_file(e: int) -> ModelFile:
        return ModelFile({}, {"w": torch.full((2,), float(e))}, {}, "enc", provenance={"epoch": e})

    for epoch, acc, loss in ((1, 0.2, 0.9), (2, 0.5, 0.8), (3, 0.4, 0.1), (4, 0.5, 0.05)):
        keeper.update(epoch, epoch * 10, {"demo_accuracy": acc, "loss": loss}, lambda e=epoch: model_file(e))
    assert keeper.best["epoch"] == 4  # not the lowest loss (3) but the best score; a tie: the lower loss
    assert read_model_file(tmp_path / "models" / "best_model.safetensors").epoch == 4
    data = json.loads((tmp_path / "run" / "best_steps.json").read_text())
    assert [h["score"] for h in data["history"]] == [0.2, 0.5, 0.4, 0.5] and data["metric"] == "demo_accuracy"
    again = BestModelKeeper(tmp_path / "run", tmp_path / "models" / "best_model.safetensors")  # resume
    assert again.best_score == 0.5 and len(again.history) == 4
    assert not again.update(5, 50, {"demo_accuracy": 0.45}, lambda: model_file(5))
    assert not again.update(
        6, 60, {"demo_accuracy": 0.5, "loss": 0.05}, lambda: model_file(6)
    )  # full tie: earlier
    assert not again.update(7, 70, {"demo_accuracy": 0.5}, lambda: model_file(7))  # no loss to break it
    assert math.isclose(again.best_score, 0.5)


def test_only_rank0_writes(tmp_path, monkeypatch):
    from moas.config import DiffusionConfig, SampleConfig
    from moas.monitor.run_monitor import RunMonitor

    settings = {"sample": SampleConfig(), "diffusion": DiffusionConfig()}

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    m = RunMonitor(tmp_path / "rank1", "", ["1girl"], encoder=None, **settings)
    m.log_step(1, losses={"total": 0.5}, lr=1e-3)
    assert m.on_checkpoint(1, 1, torch.nn.Linear(1, 1), lambda: {}) == {}
    m.close()
    assert not (tmp_path / "rank1").exists() and m.history.series("loss/total") == []
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    m0 = RunMonitor(tmp_path / "rank0", "", ["1girl"], encoder=None, **settings)
    m0.log_step(1, losses={"total": 0.5, "aux": 0.1}, lrs={"0": 1e-3, "1": 5e-4}, lr=1e-3)
    m0.close()
    assert m0.history.latest("loss/aux") == 0.1 and m0.history.latest("lr/1") == 5e-4
    assert any((tmp_path / "rank0").glob("events.out.tfevents.*"))
