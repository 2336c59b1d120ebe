"""End-to-end: the real CLI on the session's tiny model (tests/conftest.py: make-data + train) — its files,
resume, generate, eval, bad input. kill -9 and signals: tests/test_faults_process.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from moas.checkpoint import load_checkpoint, verify_checkpoint
from moas.cli import main
from moas.config import load_config
from moas.inference.model_file import verify_model_file
from moas.train.rotation import find_latest_checkpoint

from .conftest import TINY_CONFIG

pytestmark = pytest.mark.slow


def run(*args: str) -> int:
    return main([*args])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("moas: error:")]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err)
    return errors[0]


@pytest.fixture
def trained(session_run, workdir) -> Path:
    """The session's trained run (tests/conftest.py), its models copied into this test's working folder."""
    shutil.copytree(session_run / "models", workdir / "models")
    return session_run


def test_train_writes_checkpoints_model_and_tensorboard(session_run):
    trained = session_run
    ckpts = sorted((trained / "checkpoints").glob("epoch_*.pt"))
    assert [p.name for p in ckpts] == ["epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"]
    assert all(verify_checkpoint(p) for p in ckpts)
    state = load_checkpoint(trained / "checkpoints" / "epoch_0003.pt")
    for key in (
        "model",
        "ema",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "global_step",
        "rng",
        "config",
        "text_encoder",
    ):
        assert key in state
    assert state["epoch"] == 3 and state["text_encoder"] == "st:all-MiniLM-L6-v2"
    model_file = trained / "models" / "best_model.safetensors"
    assert verify_model_file(model_file)
    from safetensors import safe_open

    from moas.models.generator import MoasGenerator

    with safe_open(str(model_file), framework="pt") as f:  # the ecosystem's reader, no moas code
        meta = f.metadata()
    assert (
        json.loads(meta["provenance"])["epoch"] in (1, 2, 3) and meta["text_encoder"] == "st:all-MiniLM-L6-v2"
    )
    assert MoasGenerator(**json.loads(meta["model_args"])).resolution == 16
    run_dir = next((trained / "runs").iterdir())
    assert (run_dir / "config.toml").is_file() and (run_dir / "samples" / "epoch_0003.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    assert {"loss/total", "lr", "perf/images_per_sec"} <= set(ea.Tags()["scalars"])
    assert "samples" in ea.Tags()["images"]
    assert "config/text_summary" in ea.Tags()["tensors"]


def test_generate_is_deterministic_and_numbered(trained):
    assert (
        run("generate", "--prompt", "1girl, red hair, forest", "--output", "a.png", "--seed", "5", "--quiet")
        == 0
    )
    assert (
        run(
            "--generate", "--prompt", "1girl, red hair, forest", "--output", "b.png", "--seed", "5", "--quiet"
        )
        == 0
    )
    assert Image.open("a.png").tobytes() == Image.open("b.png").tobytes()
    params = Image.open("a.png").text["parameters"]
    assert params.startswith("1girl, red hair, forest\n") and "Seed: 5" in params and "Size: 16x16" in params
    assert (
        run(
            "generate",
            "--prompt",
            "1girl",
            "--output",
            "n.png",
            "--num_images",
            "2",
            "--seed",
            "5",
            "--width",
            "32",
            "--height",
            "30",  # within 10 % of the square this model was trained on: drawn square, cropped
            "--sampler",
            "ddim",
            "--quiet",
        )
        == 0
    )
    assert Image.open("n_000.png").size == (32, 30) and Path("n_001.png").is_file()
    assert "Size: 32x30, Base size: 16x16," in Image.open("n_000.png").text["parameters"]
    assert "Seed: 6" in Image.open("n_001.png").text["parameters"]


def test_eval_reports_accuracy_table_and_json(trained, capsys):
    assert (
        run(
            "eval",
            "--model",
            "models/best_model.safetensors",
            "--data_dir",
            str(trained / "data" / "demo"),
            "--n",
            "2",
            "--steps",
            "2",
            "--quiet",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "held_out" in out and "hair_color" in out
    result = json.loads(Path("models/eval.json").read_text())
    assert 0.0 <= result["held_out"]["mean"] <= 1.0 and result["n"]["held_out"] == 2


def test_auto_resume_continues_from_the_last_checkpoint(session_run, workdir):
    """The finished 3-epoch run continued to 4 epochs: it resumes in its own TensorBoard folder, validates
    the resumed epoch, and its learning-rate schedule is a fresh 4-epoch schedule's at that step."""
    for name in ("data", "checkpoints", "runs", "models", "session.toml"):
        copy = shutil.copytree if (session_run / name).is_dir() else shutil.copy
        copy(session_run / name, workdir / name)
    args = ["train", "--config", "session.toml", "--data_dir", "data/demo/train", "--epochs", "4"]
    assert run(*args, "--auto_resume", "--val_dir", "data/demo/train", "--quiet") == 0
    state = load_checkpoint(find_latest_checkpoint(Path("checkpoints")))
    assert state["epoch"] == 4
    per_epoch = load_checkpoint(Path("checkpoints/epoch_0001.pt"))["global_step"]
    assert state["global_step"] == 4 * per_epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list(Path("runs").iterdir())) == 1  # the resumed run continues in its TensorBoard folder
    ea = EventAccumulator(str(next(Path("runs").iterdir())))
    ea.Reload()
    # every epoch validated, the resumed one included
    assert [e.step for e in ea.Scalars("val/loss")] == [k * per_epoch for k in (1, 2, 3, 4)]
    assert ea.Scalars("loss/total")[-1].step == state["global_step"]
    from moas.train.lr_schedule import WarmupCosineRestarts

    tc = load_config(None, "session.toml", use_env=False).train
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=tc.lr)
    fresh = WarmupCosineRestarts(
        opt, 4, per_epoch, tc.warmup_fraction, tc.restart_fraction, tc.restart_mult, tc.eta_min
    )
    for _ in range(state["global_step"]):
        fresh.step()
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(fresh.get_last_lr()[0], rel=1e-9)


def test_dry_run_prints_resolved_config(capsys, workdir):
    assert run("train", "--profile", "original", "--epochs", "11", "--dry-run") == 0
    out = capsys.readouterr().out
    assert 'profile = "original"' in out and "epochs = 11" in out and "lr = 5e-06" in out


def test_brain_switches_have_flags(capsys, workdir):
    args = ("train", "--profile", "cpu_tiny", "--dry-run")
    assert run(*args, "--tag_routing", "--aux_targets", "0.05", "--expert_tokens") == 0
    brain = capsys.readouterr().out.split("[brain]")[1].split("\n[")[0]
    assert "tag_routing = true" in brain and "aux_targets = 0.05" in brain and "expert_tokens = true" in brain
    assert run(*args, "--no-tag_routing") == 0
    brain = capsys.readouterr().out.split("[brain]")[1].split("\n[")[0]
    assert "tag_routing = false" in brain and "aux_targets = 0.0" in brain


def test_bad_input_gives_one_sentence_and_nonzero_exit(trained, workdir, capsys):
    assert run("train", "--data_dir", "nope", "--config", str(TINY_CONFIG)) != 0
    assert "does not exist" in one_error_line(capsys)
    (workdir / "empty").mkdir()
    assert run("train", "--data_dir", "empty", "--config", str(TINY_CONFIG)) != 0
    assert "No images found" in one_error_line(capsys)
    (workdir / "texts").mkdir()
    (workdir / "texts" / "a.png").write_text("<html>404</html>")
    (workdir / "texts" / "b.txt").write_text("hello")
    assert run("train", "--data_dir", "texts", "--config", str(TINY_CONFIG)) != 0
    assert "could be read" in one_error_line(capsys)
    model = trained / "models" / "best_model.safetensors"
    assert run("generate", "--model", str(model), "--prompt", "") != 0
    assert "prompt is empty" in one_error_line(capsys)
    assert run("generate", "--model", "missing.pt", "--prompt", "1girl") != 0
    assert "No model file" in one_error_line(capsys)
    bad = workdir / "bad.pt"
    bad.write_bytes(model.read_bytes()[:5000])
    assert run("generate", "--model", str(bad), "--prompt", "1girl") != 0
    assert "bad.pt" in one_error_line(capsys)
    assert run("eval", "--model", str(model), "--data_dir", str(workdir / "empty")) != 0
    assert "No images found" in one_error_line(capsys)  # eval takes any folder, not only the demo's
    assert run("eval", "--model", str(model), "--data_dir", str(workdir / "nowhere")) != 0
    assert "does not exist" in one_error_line(capsys)


def test_a_corrupt_image_among_good_ones_is_skipped(demo_dir, workdir, caplog):
    data = workdir / "mixed"
    data.mkdir()
    for i, p in enumerate(sorted((demo_dir / "train").rglob("*.png"))[:6]):
        (data / f"{i}.png").write_bytes(p.read_bytes())
    (data / "broken.png").write_bytes((data / "0.png").read_bytes()[:60])
    assert run("train", "--data_dir", "mixed", "--config", str(TINY_CONFIG), "--epochs", "1", "--quiet") == 0
    assert "broken.png" in caplog.text
