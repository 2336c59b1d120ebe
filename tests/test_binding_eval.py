"""The binding evaluation of two-character demo sets: ``moas eval``, the training-time Validator, the CLI.

The fake pipelines draw the prompt's own scene with the demo drawer (or a deliberately wrong one), so the
expected scores are exact: the measurer recovers every attribute of these drawings.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from moas.cli import main
from moas.data import synthetic as syn
from moas.data import synthetic_scene as scene
from moas.eval.evaluate import run_eval, summary
from moas.eval.validate import Validator

SIZE = 32  # below 64 px: run_eval upscales before measuring, as it does for a small model
COLUMNS = ["left_hair_color", "left_eye_color", "right_hair_color", "right_eye_color", "background"]
COLUMNS += ["hair_bound", "both_bound", "hair_swapped", "mean"]


class DrawingPipeline:
    """Stands in for ``moas.inference.pipeline.Pipeline``: draws each prompt's scene with the demo drawer.

    ``mode`` "truth" draws what the prompt says, "swap" exchanges the two girls, "copy" draws the left
    girl on both sides (the right girl entirely wrong, nothing swapped)."""

    model_hash = "fake"

    def __init__(self, mode: str = "truth", size: int = SIZE) -> None:
        self.mode, self.size = mode, size
        self.prompts: list[str] = []

    def settings(self, steps, guidance_scale, sampler) -> tuple[int, float, str]:
        return steps or 1, guidance_scale or 1.0, sampler or "ddim"

    def __call__(self, prompts: list[str], seeds: list[int], **_: object) -> torch.Tensor:
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            found = scene.parse_scene_caption(prompt)
            left, right = found["left"], found["right"]
            if self.mode == "swap":
                left, right = right, left
            elif self.mode == "copy":
                right = left
            # The expression must be given: draw_scene replays the drawer's random stream without it.
            left, right = ({**g, "expression": "smile"} for g in (left, right))
            img = scene.draw_scene(
                left, right, found["background"], self.size, "artist_a", random.Random(seed)
            )
            images.append(np.asarray(img))
        self.prompts += prompts
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two")
    syn.generate_demo_dataset(out, n_images=16, size=SIZE, seed=2, progress=False, scene="two")
    return out


def test_true_drawings_are_fully_bound(two: Path, tmp_path: Path) -> None:
    pipe = DrawingPipeline("truth")
    result = run_eval(pipe, two, n_per_split=8, batch_size=5, progress=False, image_dir=tmp_path)
    assert result["scene"] == "two" and result["n"] == {"held_out": 8, "seen": 8}
    for split in ("held_out", "seen"):
        assert list(result[split]) == COLUMNS
        assert result[split]["both_bound"] == 1.0 and result[split]["hair_bound"] == 1.0
        assert result[split]["mean"] == 1.0 and result[split]["hair_swapped"] == 0.0
    held = [(c["left"]["hair_color"], c["right"]["hair_color"]) for c in result["cases"][:8]]
    assert sorted(held) == sorted(scene.held_out_bindings(2))  # 8 per split: every held-out binding once
    assert pipe.prompts == [c["prompt"] for c in result["cases"]]  # drawn in case order, batch by batch
    first = result["cases"][0]
    assert first["predicted"] == {
        "left": {k: first["left"][k] for k in ("hair_color", "eye_color")},
        "right": {k: first["right"][k] for k in ("hair_color", "eye_color")},
        "background": first["background"],
    }
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert len(saved) == 16 and saved[0] == "0000_held_out.png" and saved[-1] == "0015_seen.png"
    table = summary(result).splitlines()
    assert table[0].startswith("two-character binding") and "hair_swapped" in table[2]
    assert table[4].split()[0] == "held_out" and table[4].split()[-3:] == ["0.000", "1.000", "8"]


def test_swapped_girls_score_as_swapped(two: Path) -> None:
    result = run_eval(DrawingPipeline("swap"), two, n_per_split=4, progress=False)
    for split in ("held_out", "seen"):
        row = result[split]
        assert row["hair_swapped"] == 1.0 and row["hair_bound"] == 0.0 and row["both_bound"] == 0.0
        assert row["mean"] == 0.0 and row["background"] == 1.0  # every tag drawn, every one on the wrong side


def test_validator_scores_scene_two_by_the_held_out_binding_mean(two: Path, monkeypatch) -> None:
    validator = Validator(
        None, None, None, torch.device("cpu"), seed=0, batch_size=4, caption_pool=[], demo_dir=two, eval_n=4
    )
    monkeypatch.setattr(validator, "_pipeline", lambda model, encoder: DrawingPipeline("copy"))
    out = validator.run(torch.nn.Identity(), encoder=None)
    # Left girl right, right girl wrong: half of the four per-girl columns, though no binding is complete.
    assert out["demo_accuracy"] == 0.5 and out["accuracy"] == 0.5
    expected = run_eval(DrawingPipeline("copy"), two, n_per_split=4, progress=False)
    assert expected["held_out"]["both_bound"] == 0.0 and expected["held_out"]["mean"] == 0.5


def test_cli_eval_prints_the_binding_table(session_run: Path, two: Path, tmp_path: Path, capsys) -> None:
    model = session_run / "models" / "best_model.safetensors"
    args = ["eval", "--model", str(model), "--data_dir", str(two), "--n", "2", "--steps", "2"]
    assert main([*args, "--n_folder", "4", "--json", str(tmp_path / "eval.json"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "two-character binding" in out
    header = next(line for line in out.splitlines() if line.startswith("split"))
    assert header.split() == ["split", *COLUMNS, "n"]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["scene"] == "two" and result["n"] == {"held_out": 2, "seen": 2}
    for split in ("held_out", "seen"):
        assert list(result[split]) == COLUMNS
        assert all(0.0 <= v <= 1.0 for v in result[split].values())
    assert set(result["cases"][0]["predicted"]) == {"left", "right", "background"}
    assert "folder" in result  # the any-folder evaluation still runs on the same folder
