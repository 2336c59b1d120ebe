"""Non-leaky image augmentation: the warp stays inside the picture, differs every epoch, mirrors captions,
reaches the U-Net as conditioning during training and is absent (zeros) at sampling. An augmented run
resuming bit-identically and saving its input: the reference run of tests/test_resume.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moas.data.augment import AUG_DIM, ImageAugment, swap_sides
from moas.models.generator import MoasGenerator

TINY_MODEL = {"block_channels": [32, 32], "cross_attention": [False, True], "attention_head_dim": 16}


def test_swap_sides_swaps_whole_words_only():
    caption = "hand on left hip, Right eye closed, bright, leftover, looking right"
    assert swap_sides(caption) == "hand on right hip, Left eye closed, bright, leftover, looking left"
    assert swap_sides(swap_sides(caption)) == caption


def test_draws_are_a_pure_function_of_seed_epoch_and_index():
    aug = ImageAugment(probability=0.8)
    idx = torch.arange(16)
    a, b = aug.draw(3, 5, idx), aug.draw(3, 5, idx)
    assert a.shape == (16, AUG_DIM) and torch.equal(a, b)
    assert not torch.equal(a, aug.draw(3, 6, idx))  # another epoch, other crops
    assert torch.equal(aug.draw(3, 5, idx[4:8]), a[4:8])  # a smaller micro-batch draws the same rows
    assert not ImageAugment(probability=0.0).draw(3, 5, idx).any()  # off: all zeros


def test_crops_stay_inside_the_picture_for_every_draw():
    for aspect in (1.0, 0.5, 1.75):  # square, wide and tall buckets
        aug = ImageAugment(probability=1.0, max_rotation=15.0)
        params = aug.draw(0, 0, torch.arange(400), aspect=aspect)
        h, w = round(32 * aspect), 32
        grid = F.affine_grid(aug.matrix(params, (h, w)), [400, 3, h, w], align_corners=False)
        assert grid.abs().max() <= 1.0 + 1e-5
        assert params[:, 3].min() >= 0  # zoom never shrinks the picture
        # every transform is used
        assert (params[:, 0] == 1).any() and params[:, 1].abs().max() > 0.02 and params[:, 4].abs().max() > 0


def test_crops_differ_across_epochs_and_identity_is_the_whole_picture():
    torch.manual_seed(0)
    hr = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    aug = ImageAugment(probability=1.0, color=0.0)
    idx = torch.tensor([0, 1])
    outs = [aug.apply(hr, aug.draw(7, e, idx), (32, 32)) for e in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert (outs[i] - outs[j]).abs().mean() > 0.05
    ident = aug.apply(hr, torch.zeros(2, AUG_DIM), (32, 32))
    area = F.interpolate(hr.float().div(127.5).sub(1), size=(32, 32), mode="area")
    assert (ident - area).abs().mean() < 0.2  # the same picture, resampled (bilinear vs area)
    # a zoom-free mirror is exactly the mirrored picture
    flip = torch.zeros(2, AUG_DIM)
    flip[:, 0] = 1
    assert torch.allclose(aug.apply(hr, flip, (32, 32)), ident.flip(-1), atol=1e-5)


def test_colour_jitter_changes_colour_and_zero_leaves_it():
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    aug = ImageAugment(probability=1.0, color=0.3)
    p = torch.zeros(1, AUG_DIM)
    base = aug.apply(x, p, (16, 16))
    p[0, 5] = 0.2  # brighter
    assert (aug.apply(x, p, (16, 16)) - base).mean() > 0.1


def _generator(augment_dim: int) -> MoasGenerator:
    torch.manual_seed(0)
    return MoasGenerator(16, TINY_MODEL, {}, brain=None, augment_dim=augment_dim)


def _text(b: int) -> dict[str, torch.Tensor]:
    return {
        "tokens": torch.randn(b, 4, 768),
        "mask": torch.ones(b, 4, dtype=torch.bool),
        "tags": torch.randn(b, 2, 768),
        "tag_mask": torch.ones(b, 2, dtype=torch.bool),
    }


def test_augmentation_parameters_reach_the_unet_and_train():
    g = _generator(AUG_DIM)
    assert g.init_args["augment_dim"] == AUG_DIM
    x, t, text = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), _text(2)
    aug = torch.randn(2, AUG_DIM)
    plain = g(x, t, text).pred
    # zero-initialised: an untrained projection changes nothing, and zeros equal "no augmentation"
    assert torch.equal(g(x, t, {**text, "augment": aug}).pred, plain)
    assert torch.equal(g(x, t, {**text, "augment": torch.zeros(2, AUG_DIM)}).pred, plain)
    loss = g(x, t, {**text, "augment": aug}).pred.square().mean()
    loss.backward()
    grad = g.unet.augment_embed.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # it learns from the parameters
    with torch.no_grad():
        g.unet.augment_embed.weight.normal_()
    assert not torch.allclose(g(x, t, {**text, "augment": aug}).pred, plain)
    assert torch.equal(g(x, t, {**text, "augment": torch.zeros(2, AUG_DIM)}).pred, plain)


def test_model_without_augmentation_has_no_input_for_it():
    g = _generator(0)
    assert "augment_dim" not in g.init_args and g.unet.augment_embed is None


def test_training_inputs_mirror_captions_and_pass_the_parameters(demo_dir, text_encoder, monkeypatch):
    import moas.train.inputs as mod
    from moas.data.captions import CaptionAugment
    from moas.data.dataset import ArtDataset, collate
    from moas.text.bank import TextBank
    from moas.train.sequences import PanelTraining

    ds = ArtDataset(demo_dir / "train", 16, None, hr_margin=1.25)
    ds.validate(progress=False)
    batch = collate([ds[i] for i in range(4)])
    assert batch["pixels"].shape == (4, 3, 16, 16) and batch["pixels_hr"].shape == (4, 3, 20, 20)
    batch["captions"] = ["red hair, left hand up"] * 4
    batch.pop("style", None)
    aug = ImageAugment(probability=1.0)
    panels = PanelTraining(False, 0.0, 0.0, 0.0, 1.0, 1.0)
    inputs = mod.TrainingInputs(TextBank(text_encoder, []), CaptionAugment(), 0, panels, aug)
    x0, params = inputs.images(batch, 0, torch.device("cpu"))
    assert x0.shape == (4, 3, 16, 16) and params.shape == (4, AUG_DIM)
    params[:, 0] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    draws = mod.StepDraws.draw(torch.Generator().manual_seed(0), 4, (3, 16, 16), 1000, 0.0, None)
    seen: list[list[str]] = []
    real = mod.caption_inputs

    def record(bank, captions, device, cache=True):
        seen.append(list(captions))
        return real(bank, captions, device, cache=cache)

    monkeypatch.setattr(mod, "caption_inputs", record)
    cond, _ = inputs(batch, draws, 0, torch.device("cpu"), x0, params)
    assert seen[0] == ["red hair, right hand up", "red hair, left hand up"] * 2
    assert torch.equal(cond["augment"], aug.conditioning(params))


def test_sampling_never_passes_augmentation(text_encoder):
    from moas.config import DiffusionConfig
    from moas.inference.pipeline import Pipeline

    g = _generator(AUG_DIM)
    pipe = Pipeline(g, text_encoder, DiffusionConfig(), torch.device("cpu"))
    before = pipe(["red hair"], seeds=[5], steps=3)
    with torch.no_grad():  # a trained projection: sampling must still read zeros through it
        g.unet.augment_embed.weight.normal_(std=10.0)
    assert torch.equal(pipe(["red hair"], seeds=[5], steps=3), before)
