"""Through the real CLI on a tiny trained model: batch prompts from a file, image-to-image, fine-tuning from
a model (``--init_from``) and the model card."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moas.checkpoint import load_checkpoint
from moas.cli import main
from moas.config import load_config
from moas.inference.pipeline import Pipeline

from .conftest import TINY_CONFIG

pytestmark = pytest.mark.slow


def pixels(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("moas: error:")]


@pytest.fixture
def model(session_run) -> str:
    return str(session_run / "models" / "best_model.safetensors")


def test_from_file_loads_once_and_writes_one_image_per_line_with_its_seed(model, workdir, monkeypatch):
    loads = []
    real = Pipeline.from_file.__func__

    def counting(cls, *a, **k):
        loads.append(a[0])
        return real(cls, *a, **k)

    monkeypatch.setattr(Pipeline, "from_file", classmethod(counting))
    Path("p.txt").write_text(
        "# a comment, then three prompts\n"
        "1girl, red hair, forest --seed 9\n"
        "\n"
        "1girl, blue eyes, beach --steps 2 --scale 1.5 --negative glasses\n"
        "1girl, silver hair\n"
    )
    assert (
        main(["generate", "--model", model, "--from_file", "p.txt", "--output", "out/b.png", "--seed", "100"])
        == 0
    )
    assert len(loads) == 1
    files = sorted(Path("out").glob("*.png"))
    assert [f.name for f in files] == ["b_000.png", "b_001.png", "b_002.png"]
    params = [Image.open(f).text["parameters"] for f in files]
    assert params[0].startswith("1girl, red hair, forest\n") and "Seed: 9," in params[0]
    assert "Seed: 101," in params[1] and "Steps: 2," in params[1] and "CFG scale: 1.5," in params[1]
    assert "Negative prompt: glasses" in params[1]
    assert "Seed: 102," in params[2] and "Steps: 3," in params[2]  # the model's default steps
    # A line is the same image as a single generate with its settings.
    assert main(["generate", "--model", model, "--prompt", "1girl, red hair, forest", "--seed", "9",
                 "--output", "single.png", "--quiet"]) == 0  # fmt: skip
    assert np.array_equal(pixels("single.png"), pixels(files[0]))


def test_from_file_bad_line_fails_before_loading(model, workdir, capsys):
    Path("p.txt").write_text("1girl\nnsfw, 1girl\n")
    assert main(["generate", "--model", model, "--from_file", "p.txt"]) != 0
    (line,) = errors(capsys)
    assert "prompt 2" in line and "blacklisted" in line
    assert main(["generate", "--model", model, "--from_file", "p.txt", "--prompt", "x"]) != 0
    assert "cannot be combined" in errors(capsys)[0]
    assert main(["generate", "--model", model, "--from_file", "missing.txt"]) != 0
    assert "does not exist" in errors(capsys)[0]


def img2img(model: str, init: str, strength: float, out: str, *extra: str) -> np.ndarray:
    args = ["generate", "--model", model, "--prompt", "1girl, red hair", "--seed", "4", "--output", out]
    args += ["--init_image", init, "--strength", str(strength), "--quiet", *extra]
    assert main(args) == 0
    return pixels(out)


def test_image_to_image_strength_0_is_the_input_and_1_is_text_to_image(model, session_run, workdir):
    src = sorted((session_run / "data" / "demo" / "train").rglob("*.png"))[0]
    Image.open(src).convert("RGB").resize((16, 16), Image.Resampling.LANCZOS).save("init.png")
    raw = ["--quality_enhance", "none"]  # the sampler's output itself, not the enhancer's refinement
    assert np.array_equal(img2img(model, "init.png", 0.0, "s0.png", *raw), pixels("init.png"))
    assert main(["generate", "--model", model, "--prompt", "1girl, red hair", "--seed", "4",
                 "--output", "t2i.png", "--quiet", *raw]) == 0  # fmt: skip
    assert np.array_equal(img2img(model, "init.png", 1.0, "s1.png", *raw), pixels("t2i.png"))
    for sampler in ("dpmsolver++", "ddim", "ddpm", "euler_a"):
        half = img2img(model, "init.png", 0.6, f"h_{sampler}.png", "--sampler", sampler, "--steps", "5", *raw)
        assert not np.array_equal(half, pixels("init.png")), sampler
    text = Image.open("h_ddim.png").text["parameters"]
    assert "Denoising strength: 0.6, Init image: init.png" in text
    # A larger image of another aspect is centre-cropped and resized; the enhancer path works too.
    Image.open(src).convert("RGB").resize((48, 32)).save("wide.png")
    out = img2img(model, "wide.png", 0.5, "wide_out.png", "--width", "32", "--height", "32")
    assert out.shape == (32, 32, 3)


def test_image_to_image_bad_input(model, workdir, capsys):
    args = ["generate", "--model", model, "--prompt", "1girl"]
    assert main([*args, "--init_image", "missing.png"]) != 0
    assert "does not exist" in errors(capsys)[0]
    Path("x.png").write_bytes(b"not an image")
    assert main([*args, "--init_image", "x.png", "--strength", "1.5"]) != 0
    assert "--strength" in errors(capsys)[0]
    assert main([*args, "--init_image", "x.png"]) != 0
    assert "cannot be read" in errors(capsys)[0]


def test_init_from_starts_a_fresh_run_from_the_models_weights(model, session_run, workdir):
    from moas.inference.model_file import read_model_file
    from moas.train.builders import build_run

    shutil.copytree(session_run / "data", "data")
    overrides = {"data": {"data_dir": "data/demo/train"}, "train": {"init_from": model, "auto_resume": True}}
    cfg = load_config(None, TINY_CONFIG, overrides, use_env=False)
    kw = build_run(cfg, progress=False, dashboard=False)
    base = read_model_file(model)
    parts, state = kw["parts"], kw["state"]
    for k, v in base.weights.items():
        assert torch.equal(parts.model.state_dict()[k], v), k
        assert torch.equal(parts.ema.model.state_dict()[k], v), k
    for k, v in base.enhancer_weights.items():
        assert torch.equal(parts.side.enhancer.state_dict()[k], v), k
    assert state.global_step == 0 and not parts.opt.state and parts.sched.step_count == 0
    assert kw["record"].base_model["path"] == model and Path(kw["record"].run_dir).name.startswith("000-")
    kw["monitor"].close()


def test_init_from_trains_records_the_base_and_refuses_a_mismatch(model, session_run, workdir, capsys):
    shutil.copytree(session_run / "data", "data")
    args = ["train", "--config", str(TINY_CONFIG), "--data_dir", "data/demo/train", "--init_from", model]
    assert main([*args, "--max_steps", "2", "--save_path", "models/ft.safetensors", "--quiet"]) == 0
    state = load_checkpoint(next(Path("checkpoints").glob("*.pt")))
    assert state["global_step"] == 2 and state["optimizer"]["state"][0]["step"] == 2
    card = Path("models/ft.md").read_text()
    assert f"fine-tuned from `{model}`" in card
    Path("wide.toml").write_text(TINY_CONFIG.read_text().replace("[32, 32]", "[32, 64]"))
    bad = ["train", "--config", "wide.toml", "--data_dir", "data/demo/train", "--init_from", model]
    assert main([*bad, "--checkpoint_dir", "ck_bad", "--quiet"]) != 0
    (line,) = errors(capsys)
    assert "another architecture" in line and "block_channels" in line
    assert not Path("ck_bad").exists()
    assert main([*args, "--init_from", "missing.safetensors", "--quiet"]) != 0
    assert "no such model file" in errors(capsys)[0]


def test_model_card_beside_the_model_names_the_data(session_run):
    models = session_run / "models"
    card = (models / "best_model.md").read_text()
    assert card.startswith("# best_model\n") and "trained from random weights" in card
    assert "- folder: `data/demo/train`" in card and "- training images: 23 (1 more held out" in card
    assert "captioned: 23 of 23 (100 %)" in card and "1girl (23)" in card
    assert "best-step selection: demo_accuracy" in card and "| resolution (px) | `16` |" in card
    assert "![The run's sample grid](best_model.samples.png)" in card
    assert Image.open(models / "best_model.samples.png").size[0] > 16
    assert (models / "last_model.md").is_file()
