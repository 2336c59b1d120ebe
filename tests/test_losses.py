"""The loss stack on known inputs: zero on identical images, ordered on known shifts, gradients, NaN guard."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from moas.losses import (
    AdvancedLossFunctions,
    color_harmony_loss,
    combined_loss,
    discriminator_loss,
    line_art_loss,
    load_vgg_perceptual,
    ssim,
    ssim_loss,
)
from moas.models.discriminator import AnimeStyleDiscriminator
from moas.train.trained_net import discriminator_optimizer

NO_VGG = {"perceptual": 0.0}


def drawing(b: int = 2, size: int = 32) -> torch.Tensor:
    """Flat colour regions with dark outlines, like a tiny illustration, in [-1, 1]: (B, 3, S, S)."""
    g = torch.Generator().manual_seed(5)
    x = torch.zeros(b, 3, size, size)
    for i in range(b):
        x[i] = torch.rand(3, 1, 1, generator=g) * 1.2 - 0.6
        for _ in range(4):
            r0, c0 = torch.randint(0, size - 8, (2,), generator=g).tolist()
            h, w = torch.randint(4, 12, (2,), generator=g).tolist()
            x[i, :, r0 : r0 + h, c0 : c0 + w] = torch.rand(3, 1, 1, generator=g) * 2 - 1
            x[i, :, r0 : r0 + h, c0] = -1.0  # outline
            x[i, :, r0, c0 : c0 + w] = -1.0
    return x


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.arange(7.0) - 3
    g = torch.exp(-(k**2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, 1, 7).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), g, groups=3)
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), g.transpose(-1, -2), groups=3)


def test_identical_images_give_zero_and_ssim_one():
    x = drawing()
    assert torch.allclose(ssim((x + 1) / 2, (x + 1) / 2), torch.ones(2), atol=1e-5)
    stack = AdvancedLossFunctions(NO_VGG)
    per = stack.per_sample_terms(x, x.clone())
    assert set(per) == {"pixel", "ssim", "line_art", "color", "style", "anatomy"}
    for name, v in per.items():
        assert v.shape == (2,)
        assert v.abs().max() < 1e-5, name
    assert stack(x, x.clone()).total.abs() < 1e-5


@pytest.mark.parametrize("term", ["pixel", "ssim", "line_art", "anatomy"])
def test_larger_shift_gives_larger_loss(term):
    x = drawing()
    stack = AdvancedLossFunctions(NO_VGG)
    losses = [stack.per_sample_terms(torch.roll(x, s, dims=-1), x)[term].mean().item() for s in (1, 2, 4)]
    assert 0 < losses[0] < losses[1] < losses[2], (term, losses)


def test_more_blur_gives_larger_edge_and_ssim_loss():
    x = drawing()
    edge = [line_art_loss(blur(x, s), x).mean().item() for s in (0.5, 1.0, 2.0)]
    structural = [ssim_loss(blur(x, s), x).mean().item() for s in (0.5, 1.0, 2.0)]
    assert edge[0] < edge[1] < edge[2]
    assert structural[0] < structural[1] < structural[2]


def test_style_loss_sees_texture_not_position():
    x = drawing()
    stack = AdvancedLossFunctions(NO_VGG)
    style = [stack.per_sample_terms(blur(x, s), x)["style"].mean().item() for s in (0.5, 1.0, 2.0)]
    assert 0 < style[0] < style[1] < style[2]
    shifted = stack.per_sample_terms(torch.roll(x, 4, dims=-1), x)["style"].mean().item()
    assert shifted < 0.2 * style[1]


def test_colour_loss_sees_colour_not_position():
    x = drawing()
    shifted = torch.roll(x, 5, dims=-1)  # the same pixels elsewhere: the same colour distribution
    assert color_harmony_loss(shifted, x).max() < 1e-5
    tints = [color_harmony_loss((x + d).clamp(-1, 1), x).mean().item() for d in (0.05, 0.2, 0.5)]
    assert 0 < tints[0] < tints[1] < tints[2]
    grey = x.mean(1, keepdim=True).expand_as(x)
    assert color_harmony_loss(grey, x).mean() > color_harmony_loss(x * 0.9, x).mean()


def test_combined_loss_modes():
    x, y = drawing(), drawing().flip(-1)
    d = x - y
    assert torch.allclose(combined_loss(x, y, mixed_precision=True), d.abs().flatten(1).mean(1))
    want = 0.5 * d.square().flatten(1).mean(1) + 0.5 * d.abs().flatten(1).mean(1)
    assert torch.allclose(combined_loss(x, y, mixed_precision=False), want)
    assert torch.allclose(combined_loss(x, y, False, 1.0, 0.0), d.square().flatten(1).mean(1))


def test_every_term_back_propagates():
    x = drawing()
    disc = AnimeStyleDiscriminator()
    stack = AdvancedLossFunctions(NO_VGG)
    for name in ["pixel", "ssim", "line_art", "color", "style", "anatomy", "gan"]:
        pred = blur(x, 1.0).requires_grad_(True)
        per = stack.per_sample_terms(pred, x, fake_prob=disc(pred))
        per[name].mean().backward()
        assert pred.grad is not None and torch.isfinite(pred.grad).all(), name
        assert pred.grad.abs().sum() > 0, name


def test_nan_guard_drops_a_poisoned_term():
    x = drawing()
    stack = AdvancedLossFunctions(NO_VGG)
    pred = blur(x, 1.0).requires_grad_(True)
    per = stack.per_sample_terms(pred, x)
    per["line_art"] = per["line_art"] * torch.tensor([1.0, float("nan")])
    per["color"] = per["color"] + float("inf")
    out = stack.combine(per)
    assert sorted(out.bad) == ["color", "line_art"]
    assert "line_art" not in out.terms and "pixel" in out.terms
    assert torch.isfinite(out.total)
    out.total.backward()
    assert torch.isfinite(pred.grad).all()
    # a poisoned discriminator output only costs the gan term
    res = stack(pred.detach(), x, fake_prob=torch.full((2, 1), float("nan")))
    assert res.bad == ["gan"] and torch.isfinite(res.total)


def test_term_clamp_bounds_a_huge_term():
    x = drawing()
    stack = AdvancedLossFunctions({"perceptual": 0.0, "pixel": 1e6}, term_clamp=50.0)
    assert stack(x * 0.0, x).terms["pixel"] == 50.0


def test_sample_weights_favour_the_weighted_sample():
    x = drawing()
    pred = x.clone()
    pred[1] = torch.roll(x[1], 3, dims=-1)  # only sample 1 is wrong
    stack = AdvancedLossFunctions({"perceptual": 0.0})
    low = stack(pred, x, sample_weight=torch.tensor([1.0, 0.01])).total
    high = stack(pred, x, sample_weight=torch.tensor([0.01, 1.0])).total
    assert high > 10 * low


def test_gan_label_smoothing():
    real, fake = torch.full((4, 1), 0.9), torch.full((4, 1), 0.1)
    best = discriminator_loss(real, fake)
    assert best < discriminator_loss(torch.full((4, 1), 0.999), torch.full((4, 1), 0.001))
    assert best < discriminator_loss(torch.full((4, 1), 0.6), torch.full((4, 1), 0.4))


def test_vgg_without_local_weights_is_off_with_one_notice(tmp_path, caplog, monkeypatch):
    import moas.losses.perceptual as perceptual

    monkeypatch.setattr(perceptual, "_notified", False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with caplog.at_level(logging.INFO, logger="moas.losses.perceptual"):
        assert load_vgg_perceptual() is None
        assert load_vgg_perceptual(str(tmp_path / "missing.pth")) is None
        stack = AdvancedLossFunctions()
    assert stack.vgg is None and stack.weights["perceptual"] == 0.0
    notices = [r for r in caplog.records if "perceptual loss switched off" in r.getMessage()]
    assert len(notices) == 1
    bad = tmp_path / "hub" / "checkpoints" / "vgg16-bad.pth"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a state dict")
    assert load_vgg_perceptual() is None  # a corrupt file is refused, never used with random weights


def test_discriminator_matches_the_original():
    d = AnimeStyleDiscriminator()
    convs = [m for m in d.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 48, (3, 3), (2, 2)),
        (48, 96, (3, 3), (2, 2)),
        (96, 192, (3, 3), (2, 2)),
        (192, 384, (3, 3), (2, 2)),
    ]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.features) == 3
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in d.features) == 2
    af = [m for m in d.anime_features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in af] == [
        (384, 192, (1, 1)),
        (192, 96, (1, 1)),
    ]
    p = d(torch.randn(3, 3, 32, 32))
    assert p.shape == (3, 1) and ((p > 0) & (p < 1)).all()
    opt = discriminator_optimizer(d, generator_lr=5e-6)
    g = opt.param_groups[0]
    assert g["lr"] == 2.5e-6 and g["betas"] == (0.5, 0.999) and g["amsgrad"] is True
