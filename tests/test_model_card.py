"""The data summary and the model card, from constructed folders and model files (no training)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from moas.data.summary import data_summary
from moas.inference.model_card import card_path, grid_path, save_model
from moas.inference.model_file import ModelFile, read_model_file


def folder(root: Path) -> tuple[list[Path], list[str]]:
    """3 images in ``5_alice`` (repeat 5, multiply 0.5), 2 in ``bob``, one uncaptioned."""
    paths, captions = [], []
    for sub, n in (("5_alice", 3), ("bob", 2)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            p = root / sub / f"{i}.png"
            Image.new("RGB", (8, 8)).save(p)
            paths.append(p)
            captions.append("" if (sub, i) == ("bob", 1) else f"1girl, {sub.split('_')[-1]}, smile, 1girl")
    (root / "5_alice" / "multiply.txt").write_text("0.5")
    return paths, captions


def test_summary_counts_captions_tags_and_folder_weights(tmp_path):
    paths, captions = folder(tmp_path)
    s = data_summary(paths, captions, tmp_path, held_out=1)
    assert s["images"] == 5 and s["held_out"] == 1 and s["captioned"] == 4 and s["caption_coverage"] == 0.8
    assert s["top_tags"][:2] == [["1girl", 4], ["smile", 4]]  # a tag counts once per image
    assert s["folders"] == {"5_alice": {"images": 3, "weight": 2.5}, "bob": {"images": 2, "weight": 1.0}}


def model_file(provenance: dict) -> ModelFile:
    return ModelFile(
        model_args={"resolution": 16, "model": {}, "text": {}, "brain": {"conditioning": "text"}},
        weights={"w": torch.zeros(1000)},
        config={"profile": "cpu_tiny", "data": {"resolution": 16}, "train": {"lr": 0.001, "epochs": 3}},
        text_encoder="hash",
        provenance=provenance,
    )


def test_card_of_a_fine_tuned_model_with_a_grid(tmp_path):
    paths, captions = folder(tmp_path / "data")
    grid = tmp_path / "grid.png"
    Image.new("RGB", (40, 20), "red").save(grid)
    prov = {
        "epoch": 3,
        "global_step": 30,
        "train_seconds": 3725.0,
        "hardware": "NVIDIA GeForce RTX 3060 (12 GB)",
        "data": data_summary(paths, captions, tmp_path / "data"),
        "base_model": {"path": "models/base.safetensors", "hash": "0123456789"},
        "sample_grid": str(grid),
        "score": 0.875,
        "metric": "prompt_adherence",
    }
    path = save_model(tmp_path / "m" / "alice.safetensors", model_file(prov))
    card = card_path(path).read_text()
    assert card_path(path).name == "alice.md" and read_model_file(path).provenance["epoch"] == 3
    assert "fine-tuned from `models/base.safetensors` (hash 0123456789)" in card
    assert "- training images: 5" in card and "captioned: 4 of 5 (80 %)" in card
    assert "| `5_alice` | 3 | 2.5 |" in card and "1girl (4)" in card
    assert "1 h 02 min of training on NVIDIA GeForce RTX 3060 (12 GB)" in card
    assert "best-step selection: prompt_adherence 0.8750 at epoch 3" in card
    assert "| learning rate | `0.001` |" in card and "text conditioning" in card
    assert grid_path(path).read_bytes() == grid.read_bytes() and "(alice.samples.png)" in card
    assert "moas generate --model" in card and '--prompt "1girl, smile, alice, bob"' in card


def test_card_without_provenance_says_so(tmp_path):
    path = save_model(tmp_path / "bare.safetensors", model_file({}))
    card = card_path(path).read_text()
    assert "trained from random weights" in card and "Not recorded in this file." in card
    assert "the last weights of the run (no best-step score)" in card and "no sample grid" in card
    assert not grid_path(path).exists()
