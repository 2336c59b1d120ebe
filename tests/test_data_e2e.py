"""End to end: aspect buckets + style database + caption augmentation + spawn workers through the real
CLI, then ``moas generate --style`` from the model file alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from moas.cli import main
from moas.data.dataset import ArtDataset, smart_collate_fn
from moas.data.loader import loader_kwargs
from moas.data.sampler import BucketBatchSampler
from moas.inference.model_file import read_model_file

from .conftest import TINY_CONFIG

pytestmark = pytest.mark.slow


def _art_folder(root):
    rng = np.random.default_rng(0)
    specs = [("alice", (48, 30), (230, 80, 80)), ("bob", (30, 48), (60, 90, 220))]
    for artist, (w, h), colour in specs:
        (root / artist).mkdir(parents=True)
        for i in range(4):
            arr = np.clip(np.array(colour) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / artist / f"{i}.png")
            (root / artist / f"{i}.txt").write_text(f"{artist}, 1girl, smile, tag{i}")
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"carol_{i}.png")
    return root


def test_spawn_workers_give_the_same_batches_as_the_main_process(tmp_path):
    d = ArtDataset(_art_folder(tmp_path / "data"), 32, tmp_path / "cache", bucketing=True, divisor=2)
    d.validate(progress=False)
    sampler = BucketBatchSampler(d.bucket_ids, d.weights(), 3, seed=1)
    kw = loader_kwargs(2, torch.device("cpu"))
    assert (
        kw["multiprocessing_context"] == "spawn" and kw["persistent_workers"] and kw["prefetch_factor"] >= 1
    )
    spawned = [b for b in DataLoader(d, batch_sampler=sampler, collate_fn=smart_collate_fn, **kw)]
    inline = [b for b in DataLoader(d, batch_sampler=sampler, collate_fn=smart_collate_fn, num_workers=0)]
    assert len(spawned) == len(inline) == len(sampler)
    for a, b in zip(spawned, inline, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["pixels"], b["pixels"])
    assert {tuple(b["pixels"].shape[-2:]) for b in inline} == {(24, 40), (40, 24), (32, 32)}


def test_train_with_buckets_styles_and_workers_then_generate_with_style(tmp_path, monkeypatch, capsys):
    _art_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    env = {"BUCKETING": "true", "EXTRACT_STYLE": "true", "SHUFFLE_TAGS": "true", "KEEP_TOKENS": "1"}
    env.update({"TAG_DROPOUT": "0.1", "NUM_WORKERS": "2"})
    for k, v in env.items():
        monkeypatch.setenv(f"MOAS_DATA_{k}", v)
    monkeypatch.setenv("MOAS_RESOURCES_LOADER_WORKERS", "2")
    args = ["train", "--config", str(TINY_CONFIG), "--data_dir", "data", "--resolution", "32", "--quiet"]
    assert main([*args, "--epochs", "1"]) == 0
    report = json.loads((tmp_path / "logs" / "dataset_report.json").read_text())
    assert report["buckets"] == {"24x40": 4, "32x32": 2, "40x24": 4}
    runs = list((tmp_path / "runs").glob("*/style_db.json"))
    assert len(runs) == 1 and sorted(json.loads(runs[0].read_text())["styles"]) == ["alice", "bob", "carol"]
    assert (tmp_path / "models" / "best_model.styles.json").is_file()
    mf = read_model_file(tmp_path / "models" / "best_model.safetensors")
    assert sorted(mf.style_db["styles"]) == ["alice", "bob", "carol"]
    assert mf.model_args["style_dim"] > 0

    gen = [
        "generate",
        "--model",
        "models/best_model.safetensors",
        "--prompt",
        "1girl, smile",
        "--quiet",
        "--steps",
        "3",
    ]
    assert main([*gen, "--style", "alice", "--output", "a.png"]) == 0
    assert main([*gen, "--output", "plain.png"]) == 0
    assert "Style: alice" in Image.open("a.png").text["parameters"]
    assert not np.array_equal(np.asarray(Image.open("a.png")), np.asarray(Image.open("plain.png")))
    capsys.readouterr()
    assert main([*gen, "--style", "zed", "--output", "z.png"]) != 0
    err = capsys.readouterr().err
    assert "Unknown style 'zed'; known styles: alice, bob, carol." in err and "Traceback" not in err
