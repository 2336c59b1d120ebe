"""Model files: safetensors with the arguments and provenance in the metadata, a checksum sidecar, clear
errors for bad files, and the earlier release's ``.pt`` model files still loading."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moas.checkpoint import save_checkpoint
from moas.config import ModelConfig, TextConfig
from moas.errors import CheckpointError
from moas.inference.model_file import (
    ModelFile,
    load_generator,
    model_file_path,
    read_model_file,
    verify_model_file,
    write_model_file,
)
from moas.io import sidecar_path
from moas.models.enhance import QualityEnhancer
from moas.models.generator import MoasGenerator

UNET = asdict(ModelConfig(block_channels=[32, 32], cross_attention=[False, True], attention_head_dim=16))


def tiny_model_file() -> tuple[MoasGenerator, QualityEnhancer, ModelFile]:
    torch.manual_seed(0)
    gen = MoasGenerator(16, UNET, asdict(TextConfig()))
    enhancer = QualityEnhancer(8, 8, 1)
    mf = ModelFile(
        model_args=gen.init_args,
        weights=gen.state_dict(),
        config={"text": asdict(TextConfig())},
        text_encoder="st:all-MiniLM-L6-v2",
        enhancer_args=enhancer.init_args,
        enhancer_weights=enhancer.state_dict(),
        style_db={"styles": {"alice": [1.0, 2.0]}},
        provenance={"epoch": 4, "global_step": 40, "seed": 7},
    )
    return gen, enhancer, mf


def test_a_model_file_is_safetensors_with_what_rebuilds_the_generator(tmp_path):
    gen, enhancer, mf = tiny_model_file()
    path = write_model_file(tmp_path / "best_model.safetensors", mf)
    with safe_open(str(path), framework="pt") as f:  # any safetensors reader opens it
        meta = f.metadata()
        keys = set(f.keys())  # noqa: SIM118 (safe_open has no iterator)
    assert meta["format"] == "moas-model-v1" and meta["text_encoder"] == "st:all-MiniLM-L6-v2"
    args = json.loads(meta["model_args"])
    assert json.loads(meta["provenance"]) == {"epoch": 4, "global_step": 40, "seed": 7}
    assert keys == {f"generator.{k}" for k in gen.state_dict()} | {
        f"enhancer.{k}" for k in enhancer.state_dict()
    }
    rebuilt = MoasGenerator(**args)  # the metadata alone rebuilds the network
    back = read_model_file(path)
    rebuilt.load_state_dict(back.weights)
    for k, v in gen.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    assert back.style_db == mf.style_db and back.epoch == 4
    assert back.enhancer_args == enhancer.init_args
    assert all(torch.equal(back.enhancer_weights[k], v) for k, v in enhancer.state_dict().items())
    assert verify_model_file(path) and json.loads(sidecar_path(path).read_text())["epoch"] == 4


def test_model_files_are_always_safetensors(tmp_path):
    assert model_file_path(tmp_path / "best_model.pt") == tmp_path / "best_model.safetensors"
    _, _, mf = tiny_model_file()
    assert write_model_file(tmp_path / "m.pt", mf) == tmp_path / "m.safetensors"
    assert not (tmp_path / "m.pt").exists()


def test_bad_model_files_are_one_clear_error(tmp_path):
    _, _, mf = tiny_model_file()
    path = write_model_file(tmp_path / "m.safetensors", mf)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_model_file(path)
    with pytest.raises(CheckpointError, match="No model file"):
        read_model_file(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))  # a safetensors file, but not a moas model
    with pytest.raises(CheckpointError, match="not a moas model"):
        read_model_file(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_model_file(junk)


def test_the_previous_release_pt_model_file_still_loads(tmp_path):
    """The ``.pt`` layout the previous release wrote (EMA weights under ``ema.model``, the enhancer as
    ``{"args", "weights"}``), with a brain saved before panel memory: upgraded and loaded strictly."""
    from .test_brain import tiny_brain

    old_brain = {
        k: v for k, v in tiny_brain().items() if k not in ("panel_memory", "memory_pooled", "memory_context")
    }
    torch.manual_seed(0)
    old = MoasGenerator(16, UNET, asdict(TextConfig()), brain={**old_brain, "panel_memory": False})
    args = {**old.init_args, "brain": old_brain}  # as that release saved it: no key for later features
    enhancer = QualityEnhancer(8, 8, 1)
    state = {
        "kind": "model",
        "model_args": args,
        "ema": {"model": old.state_dict()},
        "config": {"text": asdict(TextConfig())},
        "text_encoder": "st:all-MiniLM-L6-v2",
        "epoch": 3,
        "global_step": 30,
        "enhancer": {"args": enhancer.init_args, "weights": enhancer.state_dict()},
    }
    path = save_checkpoint(
        tmp_path / "best_model.pt", state, {"epoch": 3, "global_step": 30, "kind": "model"}
    )
    mf = read_model_file(path)
    assert mf.model_args["brain"]["panel_memory"] is False and mf.epoch == 3
    model = load_generator(mf, path)
    assert not model.panel_memory and model.stage("memory_bridge") is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in old.state_dict().items())
    assert mf.enhancer_args == enhancer.init_args
