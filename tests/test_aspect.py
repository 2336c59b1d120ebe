"""Generation at any aspect ratio: the nearest trained bucket, crop not stretch, and a clear refusal."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from moas.errors import MoasError
from moas.inference.aspect import base_size, centre_crop, cover_size, requested_size, trained_sizes
from moas.inference.generate import GenerateRequest, generate
from moas.inference.pipeline import Pipeline
from moas.inference.upscale import cascade

BUCKETED = {
    "data": {"bucketing": True, "bucket_max_aspect": 2.0},
    "model": {"patch_size": 1, "block_channels": [8] * 3},
}


def test_trained_sizes_are_the_training_buckets_or_the_square():
    assert trained_sizes({}, 32) == [(32, 32)]
    assert trained_sizes({"data": {"bucketing": False}}, 32) == [(32, 32)]
    sizes = trained_sizes(BUCKETED, 32)
    assert (32, 32) in sizes and (40, 24) in sizes and (24, 40) in sizes
    assert all(w % 8 == 0 and h % 8 == 0 and max(w, h) / min(w, h) <= 2.0 for w, h in sizes)


def test_requested_size_fills_a_missing_side_with_a_square():
    assert requested_size(None, None, 32) == (32, 32)
    assert requested_size(128, None, 32) == (128, 128)
    assert requested_size(None, 96, 32) == (96, 96)
    assert requested_size(768, 512, 32) == (768, 512)


def test_base_size_is_the_nearest_trained_aspect_and_far_ones_are_refused():
    sizes = trained_sizes(BUCKETED, 32)
    assert base_size(128, 128, sizes) == (32, 32)
    assert base_size(160, 96, sizes) == (40, 24)  # 5:3 exactly
    assert base_size(96, 160, sizes) == (24, 40)
    assert base_size(150, 100, sizes) == (40, 24)  # 1.5: nearer 1.67 than 1.0
    assert base_size(180, 100, sizes) == (40, 24)  # 1.8: within 10 % of the most elongated (1.67)
    assert sizes == [(24, 40), (32, 32), (40, 24)]
    with pytest.raises(MoasError, match=r"300x100 \(aspect 3.00\) is outside the aspect ratios"):
        base_size(300, 100, sizes)
    with pytest.raises(MoasError, match="data.bucketing = true"):
        base_size(768, 512, [(32, 32)])  # a square-only model has never drawn 3:2
    assert base_size(34, 32, [(32, 32)]) == (32, 32)  # within the tolerance


def test_cover_then_crop_keeps_the_aspect():
    assert cover_size((40, 24), (160, 96)) == (160, 96)
    assert cover_size((32, 32), (96, 64)) == (96, 96)
    assert cover_size((40, 24), (150, 100)) == (167, 100)
    x = torch.arange(2 * 3 * 6 * 10).reshape(2, 3, 6, 10)
    c = centre_crop(x, 4, 6)
    assert c.shape == (2, 3, 6, 4) and torch.equal(c, x[..., :, 3:7])
    assert torch.equal(centre_crop(x, 10, 6), x)


def test_cascade_crops_a_square_instead_of_stretching_it():
    # left half red, right half blue; asking for 2:1 keeps the middle, square pixels, no squashing
    img = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    img[:, 0, :, :8] = 255
    img[:, 2, :, 8:] = 255
    out = cascade(img, None, 32, 16, mode="none")
    assert out.shape == (1, 3, 16, 32)
    wide = cascade(img, None, 64, 32, mode="none")  # 2x: covers 64x64, crops rows 16..48
    assert wide.shape == (1, 3, 32, 64)
    assert int(wide[0, 0, :, :24].float().mean()) > 240 and int(wide[0, 2, :, 40:].float().mean()) > 240


@pytest.mark.slow
def test_generate_draws_at_the_bucket_and_writes_the_requested_size(session_run, tmp_path, monkeypatch):
    pipe = Pipeline.from_file(session_run / "models" / "best_model.safetensors", torch.device("cpu"))
    pipe.model_config = copy.deepcopy(pipe.model_config)
    pipe.model_config["data"] |= {"bucketing": True, "bucket_max_aspect": 3.0}  # 16 px: 8x24, 16x16, 24x8
    drawn = []
    call = Pipeline.__call__

    def spy(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        drawn.append(tuple(out.shape[-2:]))
        return out

    monkeypatch.setattr(Pipeline, "__call__", spy)
    req = GenerateRequest(prompt="1girl, red hair", steps=2, width=48, height=16, quality_enhance="none")
    (path,) = generate(pipe, req, tmp_path / "wide.png", "tiny", progress=False)
    img = Image.open(path)
    assert img.size == (48, 16) and drawn == [(8, 24)]  # drawn at the 3:1 bucket (H, W)
    assert "Size: 48x16, Base size: 24x8," in img.text["parameters"]
    assert np.asarray(img).std() > 0
    with pytest.raises(MoasError, match="outside the aspect ratios"):
        generate(pipe, GenerateRequest(prompt="x", steps=2, width=80, height=16), tmp_path / "x.png", "t")
    assert not (tmp_path / "x.png").exists()
