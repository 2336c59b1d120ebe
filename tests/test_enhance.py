"""QualityEnhancer: exact identity untrained, SR shapes and heads, staged enhancement, degradations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moas.models.enhance import MODES, QualityEnhancer, staged_max_side
from moas.models.enhance_sr import SuperResolutionSystem, bicubic
from moas.train.degrade import degrade, jpeg_like


@pytest.fixture(scope="module")
def enhancer() -> QualityEnhancer:
    torch.manual_seed(0)
    return QualityEnhancer(width=16, sr_channels=16, sr_blocks=8).eval()


def image(b: int = 2, h: int = 16, w: int = 20) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("mode", MODES)
def test_untrained_enhancer_is_an_exact_identity(enhancer, mode):
    x = image()
    with torch.no_grad():
        assert torch.equal(enhancer(x, mode=mode), x)  # same size: every stage returns its input
        up = enhancer(x, size=(32, 40), mode=mode)
    assert torch.equal(up, bicubic(x, (32, 40)))  # upscaling: exactly bicubic


def test_untrained_identity_in_train_mode_and_staged(enhancer):
    x = image(h=40, w=40)
    enhancer.train()
    try:
        with torch.no_grad():
            assert torch.equal(enhancer(x, mode="full"), x)  # BatchNorm batch statistics do not leak through
    finally:
        enhancer.eval()
    out = enhancer.enhance(x, size=(80, 80), mode="full", max_side=32)  # staged: refine at 32 px
    assert torch.equal(out, bicubic(x, (80, 80)).clamp(-1, 1))


def test_sr_heads_and_bicubic_fallback():
    sr = SuperResolutionSystem(channels=8, num_blocks=8)
    assert len(sr.residual_blocks) == 8
    assert any(isinstance(m, torch.nn.PixelShuffle) for m in sr.up2)
    x = image(1, 8, 10)
    assert sr(x, 2).shape == (1, 3, 16, 20)
    assert sr(x, 4).shape == (1, 3, 32, 40)
    assert sr(x, 2, size=(15, 19)).shape == (1, 3, 15, 19)  # shapes differ: residual resized
    with pytest.raises(ValueError):
        sr(x, 3)


def test_upscale_picks_the_head(enhancer, monkeypatch):
    calls = []
    real = enhancer.super_resolution.forward
    monkeypatch.setattr(
        enhancer.super_resolution, "forward", lambda x, s, size=None: calls.append(s) or real(x, s, size)
    )
    x = image(1, 8, 8)
    assert enhancer.upscale(x, (16, 16)).shape[-1] == 16
    assert enhancer.upscale(x, (24, 24)).shape[-1] == 24
    assert enhancer.upscale(x, (64, 48)).shape[-2:] == (64, 48)
    assert calls == [2, 4, 4]
    assert enhancer.upscale(x, (4, 4)).shape[-1] == 4  # downscaling is plain bicubic
    assert calls == [2, 4, 4]


def test_sr_learns_beyond_bicubic():
    """A few steps on a fixed pair move the trained SR output closer to the target than bicubic."""
    torch.manual_seed(0)
    sr = SuperResolutionSystem(channels=16, num_blocks=2)
    hr = torch.zeros(4, 3, 16, 16)
    hr[:, :, :, ::2] = 1.0  # stripes that bicubic upscaling cannot restore from 8 px
    hr = hr * 2 - 1
    lr = F.avg_pool2d(hr, 2) + 0.5 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    base = F.l1_loss(bicubic(lr, (16, 16)), hr).item()
    opt = torch.optim.Adam(sr.parameters(), lr=3e-3)
    for _ in range(60):
        loss = F.l1_loss(sr(lr, 2), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * base


def test_staged_max_side_in_range():
    s = staged_max_side(torch.device("cpu"))
    assert 320 <= s <= 896 and s % 32 == 0


def test_degrade_shapes_range_and_seed():
    hr = image(3, 32, 24)
    a = degrade(hr, 2, torch.Generator().manual_seed(0))
    b = degrade(hr, 2, torch.Generator().manual_seed(0))
    c = degrade(hr, 4, torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 16, 12) and c.shape == (3, 3, 8, 6)
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    # degraded-then-bicubic is further from the original than the original is from itself
    assert F.l1_loss(bicubic(a, (32, 24)), hr) > 0.05


def test_jpeg_like_keeps_flat_blocks_and_coarsens_detail():
    flat = torch.full((1, 3, 16, 16), 0.25)
    assert torch.allclose(jpeg_like(flat, torch.tensor([1.0])), flat, atol=0.02)
    x = image(1, 13, 13)  # not a multiple of 8: padded and cropped back
    fine, coarse = jpeg_like(x, torch.tensor([1.0])), jpeg_like(x, torch.tensor([0.2]))
    assert fine.shape == x.shape
    assert (fine - x).abs().mean() < (coarse - x).abs().mean()
