"""The cascade's super-resolution diffusion stage: schedule, conditioning, crops, two-stage resume, model
file and the --upscaler choices."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from moas.checkpoint import load_checkpoint
from moas.cli import main
from moas.config_sections import SRConfig
from moas.diffusion.schedule import NoiseSchedule, make_scheduler
from moas.diffusion.sr_condition import crop_offsets, noisy_condition, sr_inputs, tag_vector, take_crops
from moas.errors import ConfigError, MoasError
from moas.inference.model_file import read_model_file
from moas.inference.pipeline import Pipeline
from moas.inference.sr_upscale import DiffusionUpscaler
from moas.models.sr_diffusion import SuperResDiffusion
from moas.train.rotation import find_latest_checkpoint

from .conftest import REFERENCE_STEPS, module_tmp, reference_checkpoint

# The stage at tests/tiny.toml's sizes (where the reference run trains it)
SR = {"train": True, "crop": 32, "block_channels": [16, 32], "attention": [False, True], "batch_size": 4}
SR["steps"] = 3


# --- schedule and objective ----------------------------------------------------------------------------


def test_resolution_shift_divides_every_snr_by_shift_squared():
    base = NoiseSchedule(make_scheduler("v_prediction"), "v_prediction", 5.0)
    shifted = NoiseSchedule(make_scheduler("v_prediction", shift=4.0), "v_prediction", 5.0)
    ratio = base.snr / shifted.snr
    assert torch.allclose(ratio, torch.full_like(ratio, 16.0), rtol=1e-3)
    assert shifted.sigma[500] > base.sigma[500]  # more noise at the same step


def test_x_prediction_targets_the_image_with_the_same_x0_weighting():
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([10, 400, 900])
    s = NoiseSchedule(make_scheduler("sample"), "sample", 5.0)
    v = NoiseSchedule(make_scheduler("v_prediction"), "v_prediction", 5.0)
    assert torch.equal(s.target(x0, noise, t), x0)
    assert torch.equal(s.predict_x0(torch.zeros_like(x0), x0, t), x0)
    # The weighted x0 error is the same whichever target the network has: v error = x0 error / σ.
    assert torch.allclose(s.loss_weight(t), v.loss_weight(t) / v.sigma[t] ** 2, rtol=1e-4)


def test_sr_config_checks_its_sizes():
    with pytest.raises(ConfigError, match="sr.crop"):
        SRConfig(crop=30)
    with pytest.raises(ConfigError, match="prediction_type"):
        SRConfig(prediction_type="x")


# --- conditioning and crops -----------------------------------------------------------------------------


def test_crops_lie_inside_their_images_and_cover_every_position():
    g = torch.Generator().manual_seed(0)
    sizes = [(40, 64), (32, 32), (64, 33)] * 400
    offsets = crop_offsets(sizes, 32, g)
    for (h, w), (y, x) in zip(sizes, offsets, strict=True):
        assert 0 <= y <= h - 32 and 0 <= x <= w - 32
    assert {x for (h, w), (_, x) in zip(sizes, offsets, strict=True) if w == 64} == set(range(33))
    images = [torch.arange(3 * h * w).view(3, h, w) for h, w in sizes[:3]]
    crops = take_crops(images, offsets[:3], 32)
    assert crops.shape == (3, 3, 32, 32)
    y, x = offsets[0]
    assert torch.equal(crops[0], images[0][:, y : y + 32, x : x + 32])
    with pytest.raises(ValueError, match="does not fit"):
        crop_offsets([(16, 64)], 32, g)


def test_conditioning_is_the_upsampled_downsampled_crop_with_variance_preserving_noise():
    hr = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn(2, 3, 32, 32)
    clean = sr_inputs(hr, 4, torch.zeros(2), noise)
    # Zero level: exactly the bicubic upsampling of the 4x-averaged image (blurrier than the original).
    assert torch.allclose(clean.mean((2, 3)), hr.mean((2, 3)), atol=0.05)
    assert (clean - hr).abs().mean() > 0.1
    full = noisy_condition(clean, torch.ones(2), noise)
    assert torch.allclose(full, noise)
    tags = torch.tensor([[[1.0, 3.0], [3.0, 5.0], [9.0, 9.0]]])
    assert torch.equal(tag_vector(tags, torch.tensor([[True, True, False]])), torch.tensor([[2.0, 4.0]]))


def tiny_stage() -> SuperResDiffusion:
    return SuperResDiffusion([16, 32], [False, True], text_dim=8, scale=4)


def test_conditioning_noise_is_drawn_in_training_and_fixed_at_sampling(tmp_path, demo_dir, text_encoder):
    from moas.data.dataset import ArtDataset
    from moas.text.bank import TextBank
    from moas.train.side_networks import hr_dataset
    from moas.train.sr_stage import SRStageTraining

    ds = ArtDataset(demo_dir / "train", 16, tmp_path / "cache")
    ds.validate()
    cfg = SRConfig(**{**SR, "cond_noise_max": 0.5, "cond_noise": 0.1})
    stage = SRStageTraining(
        cfg, hr_dataset(ds, 64), TextBank(text_encoder, [], progress=False), torch.device("cpu"), 0
    )
    levels = torch.cat([stage.batch()["level"] for _ in range(8)])
    assert levels.min() >= 0 and levels.max() <= 0.5 and levels.std() > 0.05  # random, within [0, max]
    batch = stage.batch()
    assert batch["x0"].shape == (4, 3, 32, 32) and batch["text"].shape == (4, 768)

    seen = []
    net = tiny_stage()
    real = net.forward
    net.forward = lambda x, t, cond: seen.append(cond["level"].clone()) or real(x, t, cond)
    up = DiffusionUpscaler(net, SRConfig(**{**SR, "cond_noise": 0.1}), torch.device("cpu"))
    text = {"tags": torch.randn(2, 3, 8), "tag_mask": torch.ones(2, 3, dtype=torch.bool)}
    out = up(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), text, seeds=[1, 2], steps=2)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    assert len(seen) == 2 and all(torch.allclose(s, torch.full((2,), 0.1)) for s in seen)
    again = up(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), text, seeds=[1, 2], steps=2)
    assert torch.equal(out, again)  # a function of the seeds


def test_the_upscaler_gives_the_same_images_in_chunks():
    """A batch is upscaled a few images at a time (memory); each image depends on its seed only."""
    torch.manual_seed(0)
    up = DiffusionUpscaler(tiny_stage(), SRConfig(**{**SR, "cond_noise": 0.1}), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=g)
    text = {"tags": torch.randn(3, 3, 8, generator=g), "tag_mask": torch.ones(3, 3, dtype=torch.bool)}
    whole = up(images, text, seeds=[4, 5, 6], steps=2)
    up.chunk = 2
    assert torch.equal(up(images, text, seeds=[4, 5, 6], steps=2), whole)


# --- the two-stage run -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_stage(reference):
    """The reference run (tests/conftest.py) trains the generator and the super-resolution stage together;
    its resume is compared there (tests/test_resume.py). Its last checkpoint and last model file."""
    ckpt = reference_checkpoint(reference, REFERENCE_STEPS)
    return {"state": load_checkpoint(ckpt), "mf": read_model_file(reference["result"].last_model_path)}


def test_the_stage_trains_and_its_state_is_checkpointed(two_stage):
    state = two_stage["state"]
    assert state["sr"]["steps"] == REFERENCE_STEPS and state["sr"]["ema"]["num_updates"] == REFERENCE_STEPS
    assert {"model", "ema", "optimizer", "rng", "args"} <= set(state["sr"])
    fresh = SuperResDiffusion(**state["sr"]["args"])
    trained = state["sr"]["model"]
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    mf = two_stage["mf"]
    assert mf.sr_args == state["sr"]["args"]
    assert all(torch.equal(mf.sr_weights[k], v) for k, v in state["sr"]["ema"]["model"].items())


def test_inspect_lists_the_stage_of_a_model_file_and_of_a_profile(two_stage, tmp_path, capsys):
    from moas.inference.model_file import write_model_file

    path = write_model_file(tmp_path / "m.safetensors", two_stage["mf"])
    assert main(["inspect", "--model", str(path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sr_stage"))
    n = sum(p.numel() for p in SuperResDiffusion(**two_stage["mf"].sr_args).parameters())
    assert "x4 super-resolution" in row and f"{n:,}" in row
    assert main(["inspect", "--profile", "cpu_tiny"]) == 0
    assert "sr_stage (cascade, x4 super-resolution diffusion, x-prediction)" in capsys.readouterr().out


def test_an_old_checkpoint_keeps_the_stage_for_generation(two_stage, tmp_path):
    from moas.checkpoint import save_checkpoint
    from moas.train.rotation import reduced_state

    thinned = reduced_state(two_stage["state"], "thinned")
    assert "optimizer" not in thinned["sr"] and "model" in thinned["sr"]
    small = reduced_state(two_stage["state"], "ema_bf16")
    assert set(small["sr"]) == {"args", "ema"}
    assert {v.dtype for v in small["sr"]["ema"]["model"].values()} <= {torch.bfloat16, torch.int64}
    path = save_checkpoint(tmp_path / "checkpoint_00000007.pt", small, {"global_step": REFERENCE_STEPS})
    assert read_model_file(path).sr_args == two_stage["state"]["sr"]["args"]


# --- generation ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory, two_stage) -> Path:
    with module_tmp(tmp_path_factory, "sr_model") as root:
        path = root / "model.safetensors"
        from moas.inference.model_file import write_model_file

        write_model_file(path, two_stage["mf"])
        yield path


def parameters(path: Path) -> tuple[tuple[int, int], str]:
    with Image.open(path) as im:
        return im.size, im.text["parameters"]


def test_generate_goes_through_the_cascade_by_default(sr_model, workdir):
    pipe = Pipeline.from_file(sr_model, torch.device("cpu"))
    assert pipe.sr is not None and pipe.sr.scale == 4
    assert main(["generate", "--model", str(sr_model), "--prompt", "1girl, red hair", "--quiet"]) == 0
    size, text = parameters(workdir / "result.png")
    assert size == (64, 64)  # the 16-px base x4
    assert 'Stages: "base 16x16, diffusion x4 (x-prediction, 3 steps' in text


@pytest.mark.parametrize("upscaler", ["enhancer", "bicubic"])
def test_the_other_upscalers_give_the_same_size(sr_model, workdir, upscaler):
    args = ["generate", "--model", str(sr_model), "--prompt", "1girl", "--upscaler", upscaler, "--quiet"]
    assert main(args) == 0
    size, text = parameters(workdir / "result.png")
    assert size == (64, 64) and f'Stages: "base 16x16, {upscaler}' in text


def test_diffusion_upscaler_on_a_model_without_the_stage_is_refused(session_run, workdir):
    model = session_run / "models" / "best_model.safetensors"
    args = ["generate", "--model", str(model), "--prompt", "1girl", "--upscaler", "diffusion", "--quiet"]
    assert main(args) != 0
    assert not (workdir / "result.png").exists()
    pipe = Pipeline.from_file(model, torch.device("cpu"))
    from moas.inference.upscale import choose_upscaler

    with pytest.raises(MoasError, match="no super-resolution stage"):
        choose_upscaler(pipe, "diffusion")
    assert choose_upscaler(pipe, None) in ("enhancer", "bicubic")


def test_a_stage_that_does_not_fit_is_one_clear_error(two_stage, tmp_path):
    from moas.errors import CheckpointError
    from moas.inference.model_file import write_model_file

    mf = two_stage["mf"]
    broken = type(mf)(**{**mf.__dict__, "sr_args": {**mf.sr_args, "block_channels": [8, 16]}})
    path = write_model_file(tmp_path / "broken.safetensors", broken)
    with pytest.raises(CheckpointError, match="super-resolution weights"):
        Pipeline.from_file(path, torch.device("cpu"))
    shutil.rmtree(tmp_path, ignore_errors=True)


# --- the stage on its own --------------------------------------------------------------------------------


def sr_only(root: Path, base: Path, steps: int, *extra: str) -> int:
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "sr.toml"
    cfg.write_text(
        "[sr]\ncrop = 32\nblock_channels = [16, 32]\nattention = [false, true]\nbatch_size = 4\nsteps = 2\n"
        "[resources]\ncpu_threads = 1\n"
    )
    args = ["train", "--stage", "sr", "--profile", "cpu_tiny", "--config", str(cfg), "--quiet"]
    args += ["--data_dir", str(base.parent.parent / "data" / "demo" / "train"), "--init_from", str(base)]
    args += ["--save_path", str(root / "with_sr.safetensors"), "--checkpoint_dir", str(root / "ckpt")]
    return main([*args, "--max_steps", str(steps), "--save_every_steps", "2", *extra])


def test_stage_sr_alone_adds_the_stage_and_resumes_bit_for_bit(session_run, tmp_path, workdir):
    base = session_run / "models" / "best_model.safetensors"
    assert sr_only(tmp_path / "a", base, 4) == 0
    assert sr_only(tmp_path / "b", base, 2) == 0
    assert sr_only(tmp_path / "b", base, 4, "--auto_resume") == 0
    a, b = (read_model_file(tmp_path / d / "with_sr.safetensors") for d in "ab")
    original = read_model_file(base)
    assert a.sr_args is not None and original.sr_args is None
    assert all(torch.equal(a.weights[k], v) for k, v in original.weights.items())  # the base is kept
    assert all(torch.equal(a.sr_weights[k], b.sr_weights[k]) for k in a.sr_weights)
    # The run's own loop wrote the checkpoints: its position, the stage, and no copy of the frozen generator.
    saved = load_checkpoint(find_latest_checkpoint(tmp_path / "b" / "ckpt" / "sr"))
    assert saved["global_step"] == 4 and saved["sr"]["steps"] == 4
    assert "model" not in saved and "optimizer" not in saved
    assert Pipeline.from_file(tmp_path / "a" / "with_sr.safetensors", torch.device("cpu")).sr is not None


def test_stage_sr_stops_with_one_sentence_when_its_loss_is_never_finite(
    session_run, tmp_path, workdir, monkeypatch, capsys
):
    """A skipped step does not count toward --max_steps, so a loss that is never finite would loop forever:
    after MAX_SKIPS_IN_A_ROW skips the run saves and ends with one sentence."""
    from moas.train.sr_stage import SRStageTraining

    real = SRStageTraining.loss
    monkeypatch.setattr(SRStageTraining, "loss", lambda self, batch: real(self, batch) * float("nan"))
    assert sr_only(tmp_path / "nan", session_run / "models" / "best_model.safetensors", 4) != 0
    assert "was not finite for 20 steps in a row" in capsys.readouterr().err
    saved = sorted((tmp_path / "nan" / "ckpt" / "sr").glob("checkpoint_*.pt"))
    assert saved and load_checkpoint(saved[-1])["sr"]["steps"] == 0
    assert not (tmp_path / "nan" / "with_sr.safetensors").exists()


def test_stage_sr_without_a_base_model_is_one_sentence(tmp_path, workdir, capsys):
    args = [
        "train",
        "--stage",
        "sr",
        "--profile",
        "cpu_tiny",
        "--init_from",
        str(tmp_path / "none.safetensors"),
    ]
    assert main([*args, "--quiet"]) != 0
    assert "train the base model first" in capsys.readouterr().err
