"""Panels end to end: train the tiny config on demo data with sequences, generate --panels 3. Resuming a
run on sequences bit-identically: the reference run of tests/test_resume.py has panel sequences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from moas.checkpoint import load_checkpoint
from moas.cli import main
from moas.config import load_config
from moas.data.synthetic import generate_demo_dataset
from moas.inference.pipeline import Pipeline
from moas.models.moe import EXPERT_NAMES
from moas.train.loop import build_trainer
from moas.train.rotation import find_latest_checkpoint
from moas.train.sequences import panel_parameters

from .conftest import BRAIN, TINY_CONFIG

pytestmark = pytest.mark.slow


def tiny(root: Path, data: Path, **train_kw):
    over = {
        "data": {"data_dir": str(data), "cache_dir": str(root / "cache")},
        "train": {
            "checkpoint_dir": str(root / "ckpt"),
            "run_dir": str(root / "runs"),
            "save_path": str(root / "models" / "best_model.pt"),
            "log_dir": str(root / "logs"),
            "epochs": 3,
            "sample_every": 0,
            "save_every": 100,
            **train_kw,
        },
        "monitor": {"select_best": False},
        "resources": {"cpu_threads": 1},
        **BRAIN,  # the panel memory is part of the brain
    }
    return load_config(None, TINY_CONFIG, over, use_env=False)


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seqdemo")
    generate_demo_dataset(out, n_images=6, size=32, seed=5, progress=False, sequences=5)
    return out / "train"


@pytest.fixture(scope="module")
def seq_run(seq_data, tmp_path_factory) -> dict:
    """6 steps on the sequences, with a hook on every panel parameter summing its gradients."""
    root = tmp_path_factory.mktemp("seq_run")
    trainer = build_trainer(tiny(root, seq_data, max_steps=6), progress=False)
    assert trainer.panels.enabled and trainer.data.dataset.has_sequences()
    model = trainer.parts.model
    params = panel_parameters(model)
    gate = model.stage("moe").experts.memory_gate
    assert gate.item() == 0.0
    before = [p.detach().clone() for p in params]
    grads: dict[int, float] = {}
    for i, p in enumerate(params):
        p.register_hook(lambda g, i=i: grads.__setitem__(i, grads.get(i, 0.0) + float(g.abs().sum())))
    result = trainer.run()
    return {
        "root": root,
        "model": model,
        "params": params,
        "before": before,
        "grads": grads,
        "result": result,
    }


def test_training_on_sequences_trains_the_memory(seq_run):
    model, params, before, grads = seq_run["model"], seq_run["params"], seq_run["before"], seq_run["grads"]
    result, gate = seq_run["result"], model.stage("moe").experts.memory_gate
    assert result.global_step == 6
    assert gate.item() != 0.0  # the gate opened from the diffusion + temporal losses
    assert all(i in grads for i in range(len(params))), "a panel parameter got no gradient"
    # The weights that carry the signal all moved (a conv bias right before GroupNorm has ~0 gradient
    # by construction, so "every tensor changed" would be the wrong test).
    pm, ex = model.stage("panel_memory"), model.stage("moe").experts
    moved = [
        pm.vision.backbone[0].weight,
        pm.proj.weight,
        pm.distance.weight,
        ex.mem_in_w,
        ex.mem_out.weight,
        gate,
    ]
    for p in moved:
        i = next(k for k, q in enumerate(params) if q is p)
        assert grads[i] > 0 and not torch.equal(before[i], p.detach()), tuple(p.shape)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(result.run_dir))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    expected = {"loss/temporal", "loss/temporal_feature", "loss/temporal_character", "loss/temporal_scene"}
    assert expected <= tags, tags
    assert all(e.value >= 0 for e in ea.Scalars("loss/temporal"))

    # The checkpoint holds the panel memory and rebuilds the same network.
    state = load_checkpoint(find_latest_checkpoint(seq_run["root"] / "ckpt"))
    assert state["model_args"]["brain"]["panel_memory"] is True
    assert any(k.startswith("brain.flow.stages.panel_memory.") for k in state["model"])
    pipe = Pipeline.from_file(result.model_path, torch.device("cpu"))
    assert pipe.model.panel_memory and pipe.model.stage("moe").experts.memory_gate.item() != 0.0


def test_generate_panels_cli_writes_panels_strip_and_metric(seq_run, workdir, capsys):
    model = str(seq_run["result"].model_path)
    base = ["generate", "--model", model, "--steps", "2", "--quiet"]
    prompts = "1girl, red hair, forest, smile | 1girl, red hair, forest, open mouth | 1girl, red hair, forest"
    capsys.readouterr()
    assert main([*base, "--prompt", prompts, "--panels", "--output", "story.png", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    panels = [Image.open(f"story_panel{k}.png") for k in range(3)]
    strip = Image.open("story.png")
    w, h = panels[0].size
    assert strip.size == (3 * w, h)
    assert "Panel: 2/3" in panels[1].text["parameters"] and "Seed: 5" in panels[1].text["parameters"]
    assert "Panels: 3" in strip.text["parameters"]
    report = json.loads(Path("story_panels.json").read_text())
    assert [p["pair"] for p in report["pairs"]] == [[0, 1], [1, 2]]
    assert set(report["mean"]) == {"temporal_consistency", "feature", "character", "scene"}
    assert report["seeds"] == [4, 5, 6] and "mean:" in out and "panel 0→1" in out

    # One prompt reused; mismatched counts and incompatible flags are one clear error each.
    assert main([*base, "--prompt", "1girl, forest", "--panels", "2", "--output", "two.png"]) == 0
    assert Image.open("two.png").size == (2 * w, h)
    capsys.readouterr()
    assert main([*base, "--prompt", "a | b | c", "--panels", "2", "--output", "x.png"]) != 0
    assert "does not match the 3" in capsys.readouterr().err
    assert main([*base, "--prompt", "a", "--panels", "2", "--num_images", "2", "--output", "x.png"]) != 0
    assert "cannot be combined" in capsys.readouterr().err
    assert not Path("x.png").exists()

    # Memory really conditions panel 2+: with the trained (non-zero) gate and memory bridge the prediction
    # moves; with both routes zeroed it is bit-identical to generating without the previous panels.
    pipe = Pipeline.from_file(model, torch.device("cpu"))
    gate = pipe.model.stage("moe").experts.memory_gate
    assert gate.item() != 0.0
    history = torch.stack(
        [torch.from_numpy(__import__("numpy").array(p)).permute(2, 0, 1) for p in panels[:2]]
    )
    history = torch.nn.functional.interpolate(history.float(), size=(16, 16), mode="area").round().byte()
    text = {k: v for k, v in pipe.encode(["1girl, red hair, forest"]).items()}
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([100])
    mem = {"panel_images": history.flip(0)[None], "panel_mask": torch.ones(1, 2, dtype=torch.bool)}
    with torch.no_grad():
        plain, with_mem = pipe.model(x, t, text).pred, pipe.model(x, t, text | mem).pred
        assert not torch.equal(plain, with_mem)
        bridge, to_context = (
            pipe.model.stage("memory_bridge").proj,
            pipe.model.stage("memory_bridge").context_proj,
        )
        assert bridge.weight.abs().sum() > 0 and to_context.weight.abs().sum() > 0  # trained on sequences too
        gate.fill_(0.0)
        assert not torch.equal(
            pipe.model(x, t, text | mem).pred, plain
        )  # the bridge's routes alone still act
        trained = {k: v.clone() for k, v in pipe.model.stage("memory_bridge").state_dict().items()}
        for layer in (bridge, to_context):
            layer.weight.zero_()
            layer.bias.zero_()
        assert torch.equal(pipe.model(x, t, text | mem).pred, plain)
        pipe.model.stage("memory_bridge").load_state_dict(trained)
        # Wide-open routes show in the 8-bit images too. After 6 warm-up steps both are still ~1e-6 (too
        # small to move a uint8 pixel), so the bridge gets definite weights: this checks the pipeline's
        # ``panels=`` argument reaches the model, not how far 6 steps trained it.
        gate.fill_(2.0)
        bridge.weight.copy_(
            torch.randn(bridge.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5
        )
    args = {"steps": 2, "guidance_scale": 2.0}
    alone = pipe(["1girl, red hair, forest"], [6], **args)
    after = pipe(["1girl, red hair, forest"], [6], panels=history.flip(0)[None], **args)
    assert not torch.equal(alone, after)
    assert EXPERT_NAMES[9] == "memory"


def test_inspect_lists_panel_memory_and_help_explains_panels(capsys):
    assert main(["inspect", "--config", str(TINY_CONFIG), "--conditioning", "moas"]) == 0
    out = capsys.readouterr().out
    assert "panel_memory" in out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    assert "--panels" in help_text and "_panels.json" in help_text
