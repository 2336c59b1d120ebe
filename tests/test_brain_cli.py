"""The brain through the real CLI: training logs its histograms, generate --explain, moas inspect."""

from __future__ import annotations

import os

import pytest

from moas.cli import main
from moas.inference.model_file import read_model_file

from .conftest import TINY_CONFIG, module_tmp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_brain(tmp_path_factory):
    """One epoch of the tiny profile (with its tiny brain) on 8 demo images."""
    with module_tmp(tmp_path_factory, "brain_e2e") as root:
        cwd = os.getcwd()
        os.chdir(root)
        try:
            assert (
                main(["make-data", "--out", "data/demo", "--n_images", "8", "--size", "16", "--seed", "2"])
                == 0
            )
            args = [
                "train",
                "--config",
                str(TINY_CONFIG),
                "--data_dir",
                "data/demo/train",
                "--quiet",
                "--epochs",
                "1",
            ]
            assert main([*args, "--conditioning", "moas", "--gnn_version", "3"]) == 0
        finally:
            os.chdir(cwd)
        yield root


def test_training_logs_routing_expert_and_emotion_histograms(trained_brain):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = next((trained_brain / "runs").iterdir())
    ea = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "scalars": 0})
    ea.Reload()
    hist, scalars = set(ea.Tags()["histograms"]), set(ea.Tags()["scalars"])
    assert {"routing/line_art", "routing/style", "emotion/joy", "emotion/melancholy"} <= hist
    assert {"experts/color/success_rate", "experts/color/avg_time", "experts/color/call_count"} <= scalars
    model_args = read_model_file(trained_brain / "models" / "best_model.safetensors").model_args
    assert model_args["brain"]["conditioning"] == "moas"
    assert model_args["brain"]["gnn_version"] == 3  # --gnn_version reached the model


def test_generate_explain_prints_routing_and_emotions(trained_brain, monkeypatch, capsys):
    monkeypatch.chdir(trained_brain)
    code = main(
        [
            "generate",
            "--prompt",
            "1girl, red hair, forest",
            "--steps",
            "2",
            "--output",
            "x.png",
            "--explain",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Expert routing weights:" in out and "Top emotions:" in out and "Prompt language: en" in out
    weights = [
        float(line.split()[1])
        for line in out.splitlines()
        if line.startswith("  ") and len(line.split()) >= 2
    ]
    assert len(weights) == 14 and abs(sum(weights) - 1.0) < 0.01


def test_inspect_model_and_profiles(trained_brain, monkeypatch, capsys, workdir):
    assert (
        main(["inspect", "--model", str(trained_brain / "models" / "best_model.safetensors"), "--graph"]) == 0
    )
    out = capsys.readouterr().out
    for name in (
        "moe",
        "gnn",
        "emotion",
        "understanding",
        "structure",
        "line_art",
        "story",
        "unet",
        "generator total",
    ):
        assert name in out
    assert "embedding <- gnn.graph_features (connected)" in out
    assert main(["inspect", "--profile", "cpu_tiny", "--conditioning", "text"]) == 0
    out = capsys.readouterr().out
    assert "conditioning: text" in out and "moe" not in out
    assert main(["inspect", "--model", "m.pt", "--profile", "cpu_tiny"]) != 0
    assert "moas: error:" in capsys.readouterr().err


def test_conditioning_flag_reaches_the_config(capsys, workdir):
    assert main(["train", "--profile", "cpu_tiny", "--conditioning", "text", "--dry-run"]) == 0
    assert 'conditioning = "text"' in capsys.readouterr().out
