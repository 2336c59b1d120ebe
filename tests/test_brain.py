"""The conditioning brain: understanding systems, experts, compression, vision, bridge and DataFlow wiring."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from torch import nn

from moas.config import BrainConfig, ModelConfig, TextConfig, load_config
from moas.errors import ConfigError, DataFlowError
from moas.models.art_experts import MultiLanguageStorySystem, StructureGenerator
from moas.models.compression import AdvancedCompressionSystem, quantize_8bit
from moas.models.generator import MoasGenerator
from moas.models.understanding import EMOTIONS, DeepUnderstandingSystem, EmotionalArtisticUnderstanding
from moas.models.vision import VisionEncoder
from moas.studio import MultiverseOriginStudioAI
from moas.text.language import LANGUAGES, detect_language

from .conftest import BRAIN, TINY_CONFIG

UNET = asdict(ModelConfig(block_channels=[32, 32], cross_attention=[False, True], attention_head_dim=16))
TEXT = asdict(TextConfig())


def tiny_brain(**kw) -> dict:
    return asdict(
        load_config(None, TINY_CONFIG, {"brain": {"conditioning": "moas", **kw}}, use_env=False).brain
    )


def text_batch(b: int = 2) -> dict[str, torch.Tensor]:
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return {
        "tokens": torch.randn(b, 5, 768),
        "mask": mask,
        "tags": torch.randn(b, 3, 768),
        "tag_mask": torch.ones(b, 3, dtype=torch.bool),
        "language": torch.tensor([0, 1] * (b // 2) + [0] * (b % 2)),
    }


def test_emotional_artistic_understanding_shapes_and_sizes():
    m = EmotionalArtisticUnderstanding(hidden=64)
    out = m(torch.randn(3, 768))
    assert out["emotion_embedding"].shape == (3, 768) and out["artistic"].shape == (3, 768)
    assert out["emotion_scores"].shape == (3, len(EMOTIONS)) == (3, 10)
    assert torch.allclose(out["emotion_scores"].sum(-1), torch.ones(3), atol=1e-5)
    assert len(m.element_extractors) == 5
    full = EmotionalArtisticUnderstanding()
    assert full.emotion_encoder[0].out_features == 1536
    assert full.artistic_fusion[0].in_features == 768 + 128 * 5
    assert full.emotion_to_visual[0].in_features == 768 + 10


def test_deep_understanding_shapes_sizes_and_mask():
    full = DeepUnderstandingSystem()
    assert len(full.contextual_encoder.layers) == 6 and len(full.hierarchical_layers) == 4
    layer = full.contextual_encoder.layers[0]
    assert layer.self_attn.num_heads == 12 and layer.linear1.out_features == 3072
    assert full.understanding_fusion[0].in_features == 768 * 3
    m = DeepUnderstandingSystem(hidden=64, layers=1, heads=4, ff=32).eval()
    ctx = torch.randn(2, 6, 768)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool)
    out = m(torch.randn(2, 768), ctx, mask)["understanding"]
    assert out.shape == (2, 768)
    changed = ctx.clone()
    changed[0, 3:] = 99.0  # padding of sample 0: must not matter
    changed[1, 4] = 99.0  # a real token of sample 1: must matter
    pooled = torch.randn(2, 768)
    out1, out2 = (m(pooled, c, mask)["understanding"] for c in (ctx, changed))
    assert torch.allclose(out1[0], out2[0], atol=1e-5) and not torch.allclose(out1[1], out2[1])


def test_deep_understanding_narrow_token_encoder():
    """token_dim < 768: the encoder runs narrow, masking still holds, and every part gets gradients."""
    torch.manual_seed(0)
    m = DeepUnderstandingSystem(hidden=64, layers=1, heads=4, ff=32, token_dim=32)
    assert m.contextual_encoder.layers[0].self_attn.embed_dim == 32
    assert m.attention.kdim == 32 and m.attention.embed_dim == 768
    ctx, pooled = torch.randn(2, 5, 768), torch.randn(2, 768)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1] * 5], dtype=torch.bool)
    m.eval()
    changed = ctx.clone()
    changed[0, 2:] = 50.0  # padding only
    out1, out2 = (m(pooled, c, mask)["understanding"] for c in (ctx, changed))
    assert out1.shape == (2, 768) and torch.allclose(out1, out2, atol=1e-5)
    m.train()
    m(pooled, ctx, mask)["understanding"].pow(2).mean().backward()
    for name in ("token_proj", "contextual_encoder", "contextual_proj", "attention"):
        grads = [p.grad for p in getattr(m, name).parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize(
    ("prompt", "lang"),
    [
        ("1girl, red hair, forest", "en"),
        ("森の中の女の子、赤い髪", "ja"),
        ("森林里的女孩", "zh"),
        ("숲 속의 소녀", "ko"),
        ("девушка в лесу", "ru"),
        ("เด็กผู้หญิงในป่า", "th"),
        ("una niña con el pelo rojo en el bosque", "es"),
        ("une fille avec les cheveux rouges dans la forêt", "fr"),
        ("ein Mädchen mit roten Haaren im Wald", "de"),
        ("uma menina com cabelo vermelho na floresta", "pt"),
    ],
)
def test_language_detection_covers_ten_languages(prompt, lang):
    assert LANGUAGES[detect_language(prompt)] == lang


def test_story_system_conditions_on_language_and_structure_shapes():
    story = MultiLanguageStorySystem(dim=32).eval()
    pooled = torch.randn(1, 768).repeat(2, 1)
    out = story(pooled, torch.tensor([0, 1]))
    assert out.shape == (2, 32) and not torch.allclose(out[0], out[1])
    assert StructureGenerator(32)(torch.randn(4, 32)).shape == (4, 32)


def test_compression_sizes_quantisation_bound_and_loss():
    comp = AdvancedCompressionSystem()
    assert comp.compressed_dim == 384 and comp.compressor[-1].out_features == 384
    x = torch.randn(4, 384) * 3
    q = quantize_8bit(x)
    bound = x.abs().amax(-1, keepdim=True) / 254 + 1e-6
    assert ((q - x).abs() <= bound).all()
    assert all(len(torch.unique(row)) <= 255 for row in q)  # at most 255 levels per row
    small = AdvancedCompressionSystem(hidden=64)
    pooled = torch.randn(3, 768)
    small.train()
    out = small(pooled)
    assert out["pooled_compressed"].shape == (3, 768) and out["compression_loss"].item() > 0
    out["compression_loss"].backward()
    assert small.importance_net[0].weight.grad.abs().sum() > 0
    small.eval()
    z = small.compress(pooled)
    scale = z.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(z / scale, torch.round(z / scale), atol=1e-3)  # quantised at inference


def test_vision_encoder_heads():
    out = VisionEncoder(channels=(8, 16, 16, 32)).eval()(torch.randn(2, 3, 32, 32))
    assert out["embedding"].shape == (2, 768)
    assert out["structure"].shape == out["color"].shape == out["composition"].shape == (2, 128)
    assert VisionEncoder().embedding[0].in_features == 512


def test_brain_dataflow_order_wiring_and_describe():
    g = MoasGenerator(16, UNET, TEXT, brain=tiny_brain())
    flow = g.brain.flow
    order = flow.modules_in_order()
    assert order.index("moe") < order.index("gnn") < order.index("structure")
    assert order.index("structure") < order.index("line_art") and order.index("structure") < order.index(
        "background"
    )
    assert order[-1] == "bridge"
    text = flow.describe()
    assert "embedding <- gnn.graph_features (connected)" in text
    assert "structure <- structure.structure" in text
    assert {"emotion", "understanding", "color", "camera", "story"} <= set(order)


def test_untrained_brain_adds_exactly_zero_tokens():
    g = MoasGenerator(16, UNET, TEXT, brain=tiny_brain()).eval()
    text = text_batch()
    cond = g.condition(text)
    ref = MoasGenerator(16, UNET, TEXT, brain=None).eval()
    ref.brain.flow.get_module("text_context").load_state_dict(
        g.brain.flow.get_module("text_context").state_dict()
    )
    base = ref.condition(text)
    n = base["context"].shape[1]
    assert cond["context"].shape[1] == n + 12  # one token per brain output
    assert torch.equal(cond["context"][:, n:], torch.zeros_like(cond["context"][:, n:]))
    assert torch.allclose(cond["context"][:, :n], base["context"]) and torch.allclose(
        cond["pooled"], base["pooled"]
    )


def test_dataflow_errors_cycle_and_missing_input():
    g = MoasGenerator(16, UNET, TEXT, brain=tiny_brain())
    flow = g.brain.flow
    flow.register_module("loop_a", nn.Identity(), inputs=["loop_b_out"], outputs=["loop_a_out"])
    flow.register_module("loop_b", nn.Identity(), inputs=["loop_a_out"], outputs=["loop_b_out"])
    with pytest.raises(DataFlowError, match="cycle"):
        g.condition(text_batch())
    flow.unregister_module("loop_a")
    flow.unregister_module("loop_b")
    text = text_batch()
    with pytest.raises(DataFlowError, match="needs input 'language'"):
        g.brain(**{k: v for k, v in text.items() if k != "language"})
    with pytest.raises(DataFlowError, match="already registered"):
        flow.register_module("moe", nn.Identity(), inputs=["pooled"], outputs=["x"])


class LightingExpert(nn.Module):
    """A new expert: reads the structure, adds one context token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 768)

    def forward(self, structure: torch.Tensor) -> torch.Tensor:
        return self.proj(structure).unsqueeze(1)  # (B, 1, 768)


def test_a_new_expert_plugs_in_by_registration_alone():
    g = MoasGenerator(16, UNET, TEXT, brain=tiny_brain())
    before = g.condition(text_batch())["context"].shape[1]
    g.brain.flow.register_module(
        "lighting", LightingExpert(32), inputs=["structure"], outputs=["extra_context"]
    )
    assert g.brain.flow.modules_in_order().index("lighting") > g.brain.flow.modules_in_order().index(
        "structure"
    )
    pred = g(torch.randn(2, 3, 16, 16), torch.tensor([5, 900]), text_batch()).pred
    assert g.condition(text_batch())["context"].shape[1] == before + 1
    pred.pow(2).mean().backward()
    assert g.brain.flow.get_module("lighting").proj.weight.grad.abs().sum() > 0


def test_gradients_reach_every_registered_module_from_the_diffusion_loss():
    """After two optimizer steps (the zero-initialised bridge projections have become non-zero), one more
    backward of the plain diffusion loss gives every parameter of every registered module a gradient.
    Previous panels are fed too: the panel memory and the memory expert's gated attention train from the
    diffusion loss once the gate has moved off 0 (after the second step)."""
    torch.manual_seed(0)
    g = MoasGenerator(16, UNET, TEXT, brain=tiny_brain(load_balance_weight=0.0, compression=True))
    opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    x0 = torch.randn(4, 3, 16, 16)
    panel_mask = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    text = text_batch(4) | {
        "panel_images": torch.randint(0, 256, (4, 2, 3, 16, 16), dtype=torch.uint8),
        "panel_mask": panel_mask,
    }

    def diffusion_loss():
        noise = torch.randn_like(x0)
        return (g(x0 + noise, torch.tensor([10, 200, 500, 900]), text).pred - noise).pow(2).mean()

    bridge = g.stage("bridge")
    loss = diffusion_loss()
    loss.backward()
    # Step 1: only the zero-initialised projections (and the U-Net/text path) receive gradient.
    assert all(p.grad.abs().sum() > 0 for p in bridge.projections.parameters())
    assert g.stage("moe").router[0].weight.grad.abs().sum() == 0
    for _ in range(2):
        opt.step()
        opt.zero_grad()
        diffusion_loss().backward()
    missing = []
    for name in g.brain.flow.modules_in_order():
        for pname, p in g.stage(name).named_parameters():
            if p.grad is None or p.grad.abs().sum() == 0:
                missing.append(f"{name}.{pname}")
    assert not missing, missing
    assert g.stage("moe").temperature.grad.abs().item() > 0


def test_aux_loss_includes_load_balance_and_compression():
    g = MoasGenerator(16, UNET, TEXT, brain=tiny_brain(compression=True, load_balance_weight=0.5)).eval()
    text = text_batch()
    _, aux = g(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), text)
    cond = g.condition(text)
    expected = 0.5 * cond["moe.balance_loss"] + cond["compression.compression_loss"]
    assert torch.allclose(aux, expected, rtol=1e-2, atol=1e-6)
    assert cond["compression.compression_loss"] > 0 and cond["moe.balance_loss"] >= 0
    text_only = MoasGenerator(16, UNET, TEXT, brain=None)
    assert float(text_only(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), text).aux_loss) == 0.0


def test_text_conditioning_is_the_old_text_only_model():
    old = MoasGenerator(16, UNET, TEXT)  # a model file saved before the brain: no "brain" arguments
    text_only = MoasGenerator(16, UNET, TEXT, brain=tiny_brain(conditioning="text"))
    assert old.conditioning == text_only.conditioning == "text"
    assert set(old.state_dict()) == set(text_only.state_dict())
    text_only.load_state_dict(old.state_dict())
    rebuilt = MoasGenerator(**old.init_args)  # rebuilds from the saved arguments alone
    rebuilt.load_state_dict(old.state_dict())
    assert "brain" not in old.init_args and text_only.init_args["brain"]["conditioning"] == "text"
    moas = MoasGenerator(16, UNET, TEXT, brain=tiny_brain())
    with pytest.raises(RuntimeError):
        moas.load_state_dict(old.state_dict())


def test_gnn_version_selects_the_registered_graph_module():
    for v in (1, 2, 3, 4):
        g = MoasGenerator(16, UNET, TEXT, brain=tiny_brain(gnn_version=v))
        assert g.stage("gnn").version == v
        assert sorted(g.brain_extras) == [f"gnn_v{u}" for u in (1, 2, 3, 4) if u != v]
        assert g(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), text_batch()).pred.shape == (2, 3, 16, 16)


def test_brain_config_defaults_are_the_original_and_validated():
    b = BrainConfig()
    assert (b.expert_dim, b.router_hidden, b.gnn_layers, b.understanding_layers) == (512, [1024, 512], 6, 6)
    assert (b.understanding_heads, b.understanding_ff, b.hidden_dim, b.conditioning) == (
        12,
        3072,
        1536,
        "moas",
    )
    for bad in ({"conditioning": "clip"}, {"gnn_version": 5}, {"expert_dim": 50}, {"placement": "gpu"}):
        with pytest.raises(ConfigError):
            BrainConfig(**bad)


def test_system_counts_places_and_describes():
    cfg = load_config(None, TINY_CONFIG, BRAIN, use_env=False)
    system = MultiverseOriginStudioAI.from_config(cfg)
    rows = dict(system.parameter_counts())
    assert rows["moe"] > 0 and rows["unet (DiffusionModel)"] > 0
    total = sum(n for name, n in rows.items() if name not in ("generator total", system.vision_label))
    assert total == rows["generator total"]
    assert set(system.placement().values()) == {"cpu"}
    text = system.describe(graph=True)
    assert "moe" in text and "DataFlow with" in text
    emb = system.encode_image(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert emb["embedding"].shape == (1, 768)
    # With panel memory the system's VisionEncoder is the generator's trained one, not a second copy.
    assert system.vision_shared == (system.generator.stage("panel_memory") is not None)
    if system.vision_shared:
        assert system.vision_encoder is system.generator.stage("panel_memory").vision
