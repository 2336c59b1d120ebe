"""Shared fixtures: offline Hugging Face, a fixed seed, one text encoder per session, tiny demo data."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
torch.set_num_threads(2)

TESTS = Path(__file__).parent
TINY_CONFIG = TESTS / "tiny.toml"


@contextmanager
def module_tmp(factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A temporary folder for a module-scoped fixture, deleted when the module's tests are done.

    Training runs leave checkpoints of ~250 MB even at the tiny size; pytest keeps ``mktemp`` folders until
    the session ends, so without this a full run holds several GB of them at once (CI once ran out of disk).
    """
    root = factory.mktemp(name)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def text_encoder():
    from moas.text.encoder import TextEncoder

    return TextEncoder()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small demo data set (shared, read-only for tests)."""
    from moas.data.synthetic import generate_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(out, n_images=24, size=32, seed=3, progress=False)
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run inside an empty folder so runs/, checkpoints/, cache/ land in tmp."""
    monkeypatch.chdir(tmp_path)
    for k in list(os.environ):
        if k.startswith("MOAS_"):
            monkeypatch.delenv(k)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny model trained for one epoch through ``moas train`` (shared, read-only: copy before changing).

    Returns the run's folder: ``data/demo/train`` (16 images), ``models/best_model.safetensors`` (+ its
    card), ``checkpoints/``, ``runs/``."""
    from moas.cli import main

    root = tmp_path_factory.mktemp("tiny_model")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert (
            main(["make-data", "--out", "data/demo", "--n_images", "16", "--size", "32", "--seed", "1"]) == 0
        )
        args = ["train", "--config", str(TINY_CONFIG), "--data_dir", "data/demo/train", "--epochs", "1"]
        assert main([*args, "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    return root
