from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from moas.config import ModelConfig, TextConfig
from moas.models.conditioning import ConditioningEncoder, ResidualMLP, masked_mean
from moas.models.generator import MoasGenerator
from moas.models.unet import DiffusionModel


def _text(b=2, n_tok=5, g=3):
    mask = torch.ones(b, n_tok, dtype=torch.bool)
    mask[0, 3:] = False
    tag_mask = torch.ones(b, g, dtype=torch.bool)
    tag_mask[1, 2:] = False
    return {
        "tokens": torch.randn(b, n_tok, 768),
        "mask": mask,
        "tags": torch.randn(b, g, 768),
        "tag_mask": tag_mask,
    }


def test_residual_mlp_is_identity_until_trained():
    block = ResidualMLP(16, 32)
    x = torch.randn(4, 16)
    assert torch.equal(block(x), x)


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(x, torch.tensor([[True, True, False]])).item() == 2.0


def test_conditioning_shapes_masks_and_identity():
    enc = ConditioningEncoder(layers=1)
    text = _text()
    out = enc(**text)
    assert out["context"].shape == (2, 1 + 3 + 5, 768)  # pooled + tags + tokens
    assert out["context_mask"].tolist()[0] == [True, True, True, True, True, True, True, False, False]
    norm = F.layer_norm(text["tags"], (768,))
    # Untrained: the context is exactly the normalised input (zero type embeddings, zero-init residuals).
    assert torch.allclose(out["context"][:, 1:4], norm, atol=1e-6)
    assert torch.allclose(out["pooled"][1], norm[1, :2].mean(0), atol=1e-6)


class ExtraTokens(nn.Module):
    """A new stage that adds two context tokens computed from the pooled vector."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(768, 2 * 768)

    def forward(self, pooled):
        return self.proj(pooled).view(-1, 2, 768)


def test_a_stage_plugs_in_by_registration_alone():
    enc = ConditioningEncoder()
    before = enc(**_text())["context"].shape[1]
    stage = ExtraTokens()
    enc.flow.register_module("extra", stage, inputs=["pooled"], outputs=["extra_context"])
    out = enc(**_text())
    assert out["context"].shape[1] == before + 2
    assert out["context_mask"].shape == out["context"].shape[:2]
    assert any(p is stage.proj.weight for p in enc.parameters())  # trained with the rest


def test_diffusion_model_shapes_with_patches():
    for patch in (1, 2):
        m = DiffusionModel(16, [32, 32], [False, True], attention_head_dim=16, patch_size=patch)
        x = torch.randn(2, 3, 16, 16)
        out = m(
            x,
            torch.tensor([1, 500]),
            torch.randn(2, 4, 768),
            torch.ones(2, 4, dtype=torch.bool),
            torch.randn(2, 768),
        )
        assert out.shape == x.shape


def test_generator_trains_brain_and_unet_from_the_diffusion_loss():
    mc = ModelConfig(block_channels=[32, 32], cross_attention=[False, True], attention_head_dim=16)
    g = MoasGenerator(16, asdict(mc), asdict(TextConfig()))
    pred = g(torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), _text()).pred
    pred.pow(2).mean().backward()
    brain_grads = [p.grad for p in g.brain.parameters() if p.grad is not None]
    assert brain_grads and any(gr.abs().sum() > 0 for gr in brain_grads)
    assert all(p.grad is not None for p in g.unet.parameters() if p.requires_grad)
    rebuilt = MoasGenerator(**g.init_args)
    rebuilt.load_state_dict(g.state_dict())  # constructor args rebuild the same network


def _heads(model: nn.Module) -> dict[str, int]:
    return {n: m.heads for n, m in model.named_modules() if n.endswith(("attn1", "attn2"))}


def test_attention_heads_are_channels_over_head_dim_per_level():
    m = DiffusionModel(32, [64, 128, 192], [False, True, True], attention_head_dim=32, patch_size=2)
    heads = _heads(m)
    assert heads["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2"] == 4  # 128 // 32
    assert heads["unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1"] == 6  # 192 // 32
    assert heads["unet.mid_block.attentions.0.transformer_blocks.0.attn2"] == 6
    assert heads["unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1"] == 4
    for name, mod in m.named_modules():
        if name.endswith("attn1"):
            assert mod.inner_dim // mod.heads == 32  # every head has head_dim channels


def test_files_from_before_the_head_rule_keep_their_head_count():
    from moas.config import MoasConfig
    from moas.models.upgrade import upgrade_model_args
    from moas.train.builders import generator_args

    mc = ModelConfig(block_channels=[32, 32], cross_attention=[False, True], attention_head_dim=16)
    new = MoasGenerator(16, asdict(mc), asdict(TextConfig()))
    assert set(_heads(new).values()) == {2}
    old_args = dict(new.init_args)
    old_args["model"] = {k: v for k, v in old_args["model"].items() if k != "legacy_head_count"}
    up = upgrade_model_args(old_args)
    assert up["model"]["legacy_head_count"] is True
    old = MoasGenerator(**up)
    assert set(_heads(old).values()) == {16}  # diffusers' reading of attention_head_dim, as trained
    old.load_state_dict(new.state_dict())  # same weights, another head split
    x, t, text = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), _text()
    with torch.no_grad():
        assert not torch.allclose(old(x, t, text).pred, new(x, t, text).pred)
    assert upgrade_model_args(new.init_args)["model"]["legacy_head_count"] is False
    # resuming (or fine-tuning) such a run keeps its split; a new run gets the rule
    assert generator_args(MoasConfig(), old_args)["model"]["legacy_head_count"] is True
    assert generator_args(MoasConfig())["model"]["legacy_head_count"] is False


def test_head_dim_must_divide_the_attention_levels():
    import pytest

    from moas.errors import ConfigError

    with pytest.raises(ConfigError, match="attention_head_dim"):
        ModelConfig(block_channels=[32, 96], cross_attention=[False, True], attention_head_dim=64)
