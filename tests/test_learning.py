"""Training learns: through the real ``moas train`` and ``moas eval`` commands, a small text-conditioned
model's loss falls and its images follow the prompts better than chance.

160 demo images at 32 px, 10 epochs (100 optimizer steps, under a minute on two cores). Chance is 1/8
for hair colour and 1/6 for eye colour and background (≈ 0.15 on average); the run measured 0.27 on
average and 0.47 for the background, the largest region and the first attribute a model picks up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moas.config import deep_merge, dict_to_toml, read_toml

from .conftest import TINY_CONFIG
from .test_golden import tensorboard_scalars

pytestmark = pytest.mark.slow

SETTINGS = {
    "data": {"resolution": 32},
    "model": {
        "block_channels": [32, 64],
        "cross_attention": [False, True],
        "patch_size": 2,
        "conditioning_layers": 1,  # the text context's residual MLP (tests/tiny.toml has none)
    },
    "train": {
        "epochs": 10,
        "batch_size": 16,
        "save_every": 1000,
        "sample_every": 0,
        "warmup_fraction": 0.05,
        "ema_decay": 0.99,
    },
    "brain": {"conditioning": "text"},
    "enhance": {"train": False},
    "monitor": {"select_best": False, "val_fraction": 0.0},
}


def test_training_lowers_the_loss_and_beats_chance_on_the_demo_eval(workdir):
    from moas.cli import main
    from moas.data.synthetic import generate_demo_dataset

    generate_demo_dataset(workdir / "demo", n_images=160, size=32, seed=5, progress=False)
    config = workdir / "learn.toml"
    config.write_text(dict_to_toml(deep_merge(read_toml(TINY_CONFIG), SETTINGS)))
    args = ["train", "--config", str(config), "--data_dir", "demo/train", "--seed", "0", "--quiet"]
    assert main(args) == 0
    (run,) = Path("runs").iterdir()
    loss = [v for _, v in tensorboard_scalars(run, "loss/total")]
    assert len(loss) == 100
    first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
    assert last < 0.8 * first, (first, last)

    model = next(p for p in Path("models").glob("best_model.*") if p.suffix in (".pt", ".safetensors"))
    args = ["eval", "--model", str(model), "--data_dir", "demo", "--n", "16", "--steps", "10"]
    assert main([*args, "--json", "eval.json", "--quiet"]) == 0
    result = json.loads(Path("eval.json").read_text())
    mean = (result["held_out"]["mean"] + result["seen"]["mean"]) / 2
    background = (result["held_out"]["background"] + result["seen"]["background"]) / 2
    assert mean > 0.2 and background > 0.3, (mean, background)
