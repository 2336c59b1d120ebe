import pytest
import torch
from PIL import Image

from moas.errors import MoasError
from moas.inference.generate import (
    GenerateRequest,
    output_paths,
    parameters_text,
    save_png,
    validate_request,
)
from moas.inference.upscale import resize_to


def test_parameters_chunk_is_a1111_style(tmp_path):
    req = GenerateRequest(
        prompt="1girl, red hair", negative_prompt="glasses", steps=12, guidance_scale=4.5, sampler="euler_a"
    )
    text = parameters_text(req, 42, (32, 32), "abcdef0123", "best_model")
    lines = text.split("\n")
    assert lines[0] == "1girl, red hair" and lines[1] == "Negative prompt: glasses"
    assert (
        "Steps: 12, Sampler: Euler a, CFG scale: 4.5, Seed: 42, Size: 32x32, Model hash: abcdef0123"
        in lines[2]
    )
    img = torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8)
    save_png(img, tmp_path / "x.png", text)
    back = Image.open(tmp_path / "x.png")
    assert back.text["parameters"] == text
    assert torch.equal(torch.from_numpy(__import__("numpy").array(back)).permute(2, 0, 1), img)


def test_output_numbering_and_validation(tmp_path):
    assert output_paths(tmp_path / "r.png", 1) == [tmp_path / "r.png"]
    assert [p.name for p in output_paths(tmp_path / "r.png", 3)] == ["r_000.png", "r_001.png", "r_002.png"]
    with pytest.raises(MoasError, match="must be a .png"):
        output_paths(tmp_path / "r.jpg", 1)
    with pytest.raises(MoasError, match="prompt is empty"):
        validate_request(GenerateRequest(prompt="   "))
    with pytest.raises(MoasError, match="--width"):
        validate_request(GenerateRequest(prompt="x", width=3))


def test_resize_keeps_range():
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = resize_to(img, 16, 24)
    assert out.shape == (2, 3, 24, 16) and out.dtype == torch.uint8
    assert resize_to(img, None, None) is img
