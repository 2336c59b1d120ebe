"""Inpainting / outpainting: kept pixels bit-identical, canvas sizes, seam metrics, bad input."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from moas.config import DiffusionConfig, ModelConfig, TextConfig
from moas.diffusion.inpaint import repaint
from moas.diffusion.schedule import NoiseSchedule, make_train_scheduler
from moas.errors import DataError, MoasError
from moas.inference.edit import EditRequest, edit, parse_outpaint, working_size
from moas.inference.pipeline import Pipeline
from moas.losses.seam import attention_edge_loss, overlap_loss, overlap_zone, seam_metrics
from moas.models.generator import MoasGenerator


@pytest.fixture(scope="module")
def pipe(text_encoder) -> Pipeline:
    torch.manual_seed(0)
    m = ModelConfig(block_channels=[32, 32], cross_attention=[False, True], attention_head_dim=16)
    model = MoasGenerator(16, asdict(m), asdict(TextConfig()))
    return Pipeline(model, text_encoder, DiffusionConfig(), torch.device("cpu"))


@pytest.fixture
def picture(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)  # odd size: not a multiple of the U-Net stride
    Image.fromarray(img).save(tmp_path / "in.png")
    mask = np.zeros((20, 24), np.uint8)
    mask[5:12, 6:15] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path, img, mask > 127


def test_inpainting_keeps_unmasked_pixels_bit_identical(pipe, picture):
    d, img, mask = picture
    req = EditRequest(
        image=str(d / "in.png"), mask=str(d / "mask.png"), prompt="1girl, red hair", steps=3, resample=2
    )
    m = edit(pipe, req, d / "out.png", progress=False)
    out = np.asarray(Image.open(d / "out.png").convert("RGB"))
    assert out.shape == img.shape
    assert np.array_equal(out[~mask], img[~mask])  # every kept pixel, bit for bit
    assert not np.array_equal(out[mask], img[mask])  # the masked region was regenerated
    assert m["kept_pixels_identical"] == 1.0
    assert set(m) >= {"overlap_mse", "attention_edge", "seam_loss"} and all(np.isfinite(list(m.values())))
    text = Image.open(d / "out.png").text["parameters"]
    assert "Seam overlap MSE" in text and "RePaint" in text


def test_outpainting_extends_the_canvas_and_keeps_the_original(pipe, picture):
    d, img, _ = picture
    req = EditRequest(image=str(d / "in.png"), prompt="forest", outpaint=(8, 4, 0, 6), steps=2, resample=1)
    m = edit(pipe, req, d / "wide.png", progress=False)
    out = np.asarray(Image.open(d / "wide.png").convert("RGB"))
    assert out.shape == (20 + 6, 24 + 12, 3)
    assert np.array_equal(out[0:20, 8 : 8 + 24], img)
    assert 0 < m["generated_fraction"] < 1 and m["overlap_mse"] >= 0


def test_edit_bad_input(pipe, picture, tmp_path):
    d, _, _ = picture
    with pytest.raises(MoasError, match="four non-negative"):
        parse_outpaint("1,2,3")
    with pytest.raises(MoasError, match="four non-negative"):
        parse_outpaint("1,-2,3,4")
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(MoasError, match="must match"):
        edit(pipe, EditRequest(str(d / "in.png"), "x", mask=str(tmp_path / "small.png")), d / "o.png", False)
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(MoasError, match="Nothing to generate"):
        edit(pipe, EditRequest(str(d / "in.png"), "x", mask=str(tmp_path / "black.png")), d / "o.png", False)
    with pytest.raises(DataError, match="does not exist"):
        edit(pipe, EditRequest(str(d / "nope.png"), "x", mask=str(d / "mask.png")), d / "o.png", False)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot be read"):
        edit(pipe, EditRequest(str(tmp_path / "junk.png"), "x", mask=str(d / "mask.png")), d / "o.png", False)
    assert not (d / "o.png").exists()


def test_working_size_keeps_aspect_and_stride():
    assert working_size(32, 32, 32, 8) == (32, 32)
    h, w = working_size(100, 300, 32, 8)
    assert h % 8 == 0 and w % 8 == 0 and w > 2 * h


def test_repaint_with_an_analytic_denoiser():
    """A denoiser that knows x0 = 0.5 everywhere: the masked region converges to 0.5, the known one stays."""
    sched = NoiseSchedule(make_train_scheduler(DiffusionConfig()), "v_prediction", 0.0)
    target = 0.5

    def v_of(x, t):
        a, s = sched.alpha[t].view(-1, 1, 1, 1), sched.sigma[t].view(-1, 1, 1, 1)
        eps = (x - a * target) / s
        return a * eps - s * target

    known = torch.full((1, 3, 8, 8), -0.25)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    x = repaint(v_of, sched, known, mask, [0], steps=10, resample=2)
    assert torch.allclose(x[..., 2:6, 2:6], torch.full((1, 3, 4, 4), target), atol=1e-3)
    assert torch.allclose(x * (1 - mask), known * (1 - mask), atol=1e-5)


def test_seam_metrics_order():
    ref = torch.rand(1, 3, 40, 40) * 2 - 1
    mask = torch.zeros(1, 1, 40, 40)
    mask[..., :, 30:] = 1  # generate the right strip
    zone = overlap_zone(mask, band=32)
    assert zone[..., :, 30:].sum() == 0 and zone[..., :, :30].sum() == 40 * 30  # all kept pixels within 32 px
    assert overlap_zone(mask, band=4)[..., :, :26].sum() == 0
    m0 = seam_metrics(ref, ref, mask)
    assert m0["overlap_mse"] == 0 and m0["attention_edge"] < 1e-6
    near = overlap_loss(ref + 0.05, ref, zone).item()
    far = overlap_loss(ref + 0.3, ref, zone).item()
    assert 0 < near < far
    blurred = torch.nn.functional.avg_pool2d(ref, 3, 1, 1)
    assert attention_edge_loss(blurred, ref, zone).item() > attention_edge_loss(ref * 0.98, ref, zone).item()
