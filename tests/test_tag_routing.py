"""Brain specialisation, routing side: per-tag routing, the keyword prior, expert tokens, reading the routing,
and that with every new switch off the generator is exactly the one before them."""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import pytest
import torch

from moas.config import BrainConfig, DiffusionConfig, ModelConfig, TextConfig
from moas.errors import ConfigError
from moas.models.generator import MoasGenerator
from moas.models.moe import EXPERT_NAMES, EnhancedMoE
from moas.models.routing_info import describe_tag_routing, entropy_bits, mutual_information, tag_choices
from moas.models.tag_prior import OTHER_INDEX, caption_categories, tag_category, tag_category_batch
from moas.models.tag_routing import routed_inputs, tag_balance_loss, tag_weights
from moas.models.upgrade import features_missing, upgrade_model_args
from moas.text.encoder import split_tags
from moas.text.inputs import caption_inputs

E = len(EXPERT_NAMES)
COLOR = EXPERT_NAMES.index("color")
SMALL = {
    "expert_dim": 32,
    "router_hidden": [32, 32],
    "hidden_dim": 32,
    "expert_heads": 4,
    "cross_expert_heads": 4,
    "gnn_layers": 2,
    "gnn_heads": 4,
    "understanding_layers": 1,
    "understanding_heads": 4,
    "understanding_ff": 32,
    "panel_channels": [8, 16, 16, 16],
}
UNET = asdict(ModelConfig(block_channels=[32, 32], cross_attention=[False, True], attention_head_dim=16))
TEXT = asdict(TextConfig())
NEW_SWITCHES = ("tag_routing", "tag_prior", "aux_targets", "expert_tokens")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small tensors: one thread is faster here and leaves the other core to whatever else runs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def brain(**kw) -> dict:
    return asdict(BrainConfig(**SMALL, **kw))


def generator(seed: int = 0, **kw) -> MoasGenerator:
    torch.manual_seed(seed)
    return MoasGenerator(16, UNET, TEXT, brain=brain(**kw))


class StubSource:
    """A TextSource with random embeddings and the encoder's layout: one tag vector per comma-separated tag,
    and one zero tag for a caption without tags (as the null prompt)."""

    def batch(self, captions: list[str], device="cpu", cache: bool = True) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(len(captions))
        b, g = len(captions), max([1] + [len(split_tags(c)) for c in captions])
        tags = torch.randn(b, g, 768, generator=gen)
        tag_mask = torch.zeros(b, g, dtype=torch.bool)
        for i, c in enumerate(captions):
            n = len(split_tags(c))
            tag_mask[i, : max(n, 1)] = True
            tags[i, n:] = 0.0
        tokens = torch.randn(b, 4, 768, generator=gen)
        return {
            "tokens": tokens,
            "mask": torch.ones(b, 4, dtype=torch.bool),
            "tags": tags,
            "tag_mask": tag_mask,
        }


def text_inputs(gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Two prompts, the first with a padded tag slot (the flags-off pins below were taken on these)."""
    gen = gen or torch.Generator().manual_seed(1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return {
        "tokens": torch.randn(2, 5, 768, generator=gen),
        "mask": mask,
        "tags": torch.randn(2, 3, 768, generator=gen),
        "tag_mask": torch.tensor([[True, True, False], [True, True, True]]),
        "language": torch.tensor([0, 1]),
    }


# ----------------------------------------------------------------------------------- all switches off


# Measured with the code before these switches existed (same construction, seed and inputs).
PINNED = {
    "keys": 585,
    "keys_sha256": "de8b801fa21a1176ccaa52a81ce45b6deee30de50ad8a982f6b78a41a9a762e1",
    "pred_sum": 56.419322617177386,
    "pred_abs_sum": 410.4628536073142,
    "aux": 0.0009933674009516835,
    "grad_abs_sum": 222.10773515002572,
}


def test_with_the_switches_off_the_generator_is_the_one_from_before():
    assert {k: asdict(BrainConfig())[k] for k in NEW_SWITCHES} == {
        "tag_routing": False,
        "tag_prior": 2.0,
        "aux_targets": 0.0,
        "expert_tokens": False,
    }
    g = generator().train()
    keys = sorted(g.state_dict())
    assert len(keys) == PINNED["keys"]
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest() == PINNED["keys_sha256"]
    gen = torch.Generator().manual_seed(1)
    text = text_inputs(gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    # Inputs of the new switches are ignored by a model built without them.
    text |= {"tag_category": torch.zeros(2, 3, dtype=torch.long), "aux_image": torch.zeros(2, 3, 16, 16)}
    torch.manual_seed(2)  # dropout masks
    out = g(x, torch.tensor([3, 700]), text)
    (out.pred.pow(2).mean() + out.aux_loss).backward()
    grad = sum(float(p.grad.double().abs().sum()) for p in g.parameters() if p.grad is not None)
    got = {
        "pred_sum": float(out.pred.detach().double().sum()),
        "pred_abs_sum": float(out.pred.detach().double().abs().sum()),
        "aux": float(out.aux_loss.detach()),
        "grad_abs_sum": grad,
    }
    for k, v in got.items():
        assert v == pytest.approx(PINNED[k], rel=1e-5), k


def test_switches_on_add_modules_but_leave_every_other_initial_weight_alone():
    off = generator().state_dict()
    on = generator(tag_routing=True, aux_targets=0.5, expert_tokens=True).state_dict()
    added = set(on) - set(off)
    assert set(off) <= set(on)
    assert added and all(".aux_targets." in k or ".expert_tokens." in k for k in added)
    assert all(torch.equal(off[k], on[k]) for k in off)  # the new modules draw no random numbers
    assert generator(tag_routing=True).state_dict().keys() == off.keys()  # routing reuses the router


def test_old_model_arguments_get_the_switches_off():
    old = {k: v for k, v in brain().items() if k not in NEW_SWITCHES}
    assert set(features_missing({"brain": old})) >= {"tag_routing", "aux_targets", "expert_tokens"}
    up = upgrade_model_args({"resolution": 16, "model": UNET, "text": TEXT, "brain": old})["brain"]
    assert {k: up[k] for k in NEW_SWITCHES} == {k: brain()[k] for k in NEW_SWITCHES}
    assert features_missing({"brain": brain()}) == ()
    with pytest.raises(ConfigError):
        BrainConfig(aux_targets=-1.0)


# ----------------------------------------------------------------------------------- per-tag routing


def small_moe() -> EnhancedMoE:
    torch.manual_seed(0)
    return EnhancedMoE(48, 32, (40, 24), expert_heads=4, cross_heads=4, context_dim=None, tag_routing=True)


def test_per_tag_routing_shapes_rows_and_masked_tags():
    moe = small_moe().eval()
    tags = torch.randn(3, 4, 48)
    tag_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    out = moe(torch.randn(3, 48), tags=tags, tag_mask=tag_mask)
    w = out["tag_routing"]
    assert (
        w.shape == (3, 4, E) and out["routing"].shape == (3, E) and out["expert_states"].shape == (3, E, 32)
    )
    assert torch.allclose(w[tag_mask].sum(-1), torch.ones(int(tag_mask.sum())), atol=1e-6)
    assert torch.equal(w[~tag_mask], torch.zeros_like(w[~tag_mask]))  # padding gets no weight
    assert torch.allclose(out["routing"].sum(-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(out["routing"][2], w[2, 0])  # one real tag: its row is the prompt's routing
    changed = tags.clone()
    changed[0, 2:] = 50.0  # padding of prompt 0: no effect on anything
    changed[1, 3] = 50.0  # a real tag of prompt 1: changes its experts' inputs
    again = moe(torch.randn(3, 48), tags=changed, tag_mask=tag_mask)
    assert torch.allclose(again["expert_states"][0], out["expert_states"][0], atol=1e-5)
    assert not torch.allclose(again["expert_states"][1], out["expert_states"][1], atol=1e-3)
    assert torch.allclose(again["expert_states"][2], out["expert_states"][2], atol=1e-5)
    # Without tag routing the pooled vector alone drives the experts; the tags are not read.
    plain = EnhancedMoE(48, 32, (40, 24), expert_heads=4, cross_heads=4, context_dim=None).eval()
    x = torch.randn(3, 48)
    assert torch.equal(plain(x)["expert_states"], plain(x, tags=tags, tag_mask=tag_mask)["expert_states"])


def test_each_expert_reads_the_tags_routed_to_it():
    tags = torch.randn(1, 3, 8)
    w = torch.zeros(1, 3, E)
    w[0, 0, 0], w[0, 1, 1], w[0, 2, 1] = 1.0, 0.25, 0.75  # expert 0 ← tag 0; expert 1 ← ¼ tag 1 + ¾ tag 2
    x = routed_inputs(tags, w)  # (1, E, 8)
    assert torch.allclose(x[0, 0], tags[0, 0]) and torch.allclose(
        x[0, 1], 0.25 * tags[0, 1] + 0.75 * tags[0, 2]
    )


def test_tag_balance_loss_is_zero_for_an_even_load_over_real_tags_and_grows_with_concentration():
    mask = torch.tensor([[True, True, False]] * 7)  # 14 real tags, 7 padded
    uniform = torch.full((7, 3, E), 1.0 / E)
    uniform[:, 2] = torch.softmax(torch.randn(7, E) * 5, -1)  # padded rows: ignored whatever they hold
    assert tag_balance_loss(uniform, mask).abs().item() < 1e-6
    one_each = torch.zeros(7, 3, E)
    one_each.view(21, E)[torch.tensor([i for i in range(21) if i % 3 != 2]), torch.arange(14)] = 1.0
    assert tag_balance_loss(one_each, mask).abs().item() < 1e-6  # every expert gets one tag: even load
    all_one = torch.zeros(7, 3, E)
    all_one[..., 0] = 1.0
    assert tag_balance_loss(all_one, mask).item() == pytest.approx(E - 1)  # the maximum
    for _ in range(5):
        rand = tag_weights(torch.randn(7, 3, E) * 3, mask)
        assert tag_balance_loss(rand, mask).item() >= 0.0


def test_keyword_categories_and_their_alignment_with_the_tags():
    expected = {
        "red hair": "color",
        "blue eyes": "color",
        "light blue dress": "color",
        "white background": "scene",
        "forest": "scene",
        "sunlight": "light",
        "backlighting": "light",
        "sitting": "anatomy",
        "long hair": "anatomy",
        "from above": "camera",
        "cowboy shot": "camera",
        "masterpiece": "quality",
        "best quality": "quality",
        "by someone": "style",
        "artist:someone": "style",
        "monochrome": "line_art",
        "1girl": "structure",
        "smile": "story",
        "zxcv": "other",
    }
    assert {t: tag_category(t) for t in expected} == expected
    cats = tag_category_batch(["red hair, zxcv, forest", "", "from above"], 4)
    assert cats.tolist() == [
        [COLOR, OTHER_INDEX, EXPERT_NAMES.index("scene"), OTHER_INDEX],
        [OTHER_INDEX] * 4,
        [EXPERT_NAMES.index("camera"), OTHER_INDEX, OTHER_INDEX, OTHER_INDEX],
    ]
    text = caption_inputs(StubSource(), ["red hair, zxcv, forest", ""], "cpu")
    assert text["tag_category"].shape == text["tag_mask"].shape == (2, 3)


def test_the_prior_sends_colour_tags_to_the_colour_expert_at_initialisation(text_encoder):
    g = generator(tag_routing=True).eval()
    colours = ["red hair", "blue eyes", "green dress", "silver hair", "pink skirt", "black jacket"]
    text = caption_inputs(text_encoder, [", ".join(colours), "forest, zxcv"], "cpu")
    with torch.no_grad():
        w = g.condition(text)["tag_routing"]  # (2, G, E)
        assert (w[0, : len(colours)].argmax(-1) == COLOR).all()
        assert w[1, 0].argmax() == EXPERT_NAMES.index("scene")
        # Without the prior (tag_prior = 0) the untrained router has no reason to pick colour.
        g.stage("moe").tag_prior = 0.0
        flat = g.condition(text)["tag_routing"]
        assert flat[0, 0, COLOR] < w[0, 0, COLOR] and flat[0, 0].max() < 0.5


# ----------------------------------------------------------------------------------- expert tokens


def test_expert_tokens_reach_cross_attention_and_get_gradient():
    off, on = generator(), generator(expert_tokens=True)
    text = text_inputs()
    n_off = off.condition(text)["context"].shape[1]
    cond = on.condition(text)
    assert cond["context"].shape[1] == n_off + E + 1  # 14 experts and the GNN
    assert torch.equal(cond["context"][:, -(E + 1) :], torch.zeros(2, E + 1, 768))  # exactly zero untrained
    stage = on.stage("expert_tokens")
    seen: dict[str, torch.Tensor] = {}

    def keep_tokens(module, inputs, out) -> None:
        out["extra_context"].retain_grad()
        seen["tokens"] = out

    stage.register_forward_hook(keep_tokens)
    on.unet.register_forward_pre_hook(lambda m, args: seen.update(context=args[2]))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    on(x, t, text).pred.pow(2).mean().backward()
    tokens = seen["tokens"]["extra_context"]
    assert torch.equal(seen["context"][:, -(E + 1) :], tokens)  # the U-Net's cross-attention context
    assert (tokens.grad.abs().sum(-1) > 0).all()  # every token matters to the prediction
    assert stage.proj.weight.grad.abs().sum() > 0 and (stage.embed.grad.abs().sum(-1) > 0).all()
    opt = torch.optim.Adam(stage.parameters(), lr=1e-2)
    opt.step()
    on.zero_grad()
    on(x, t, text).pred.pow(2).mean().backward()
    states = on.stage("moe").experts.out_w.grad
    assert states is not None and states.abs().sum() > 0
    tok = seen["tokens"]["extra_context"].detach()
    assert not torch.allclose(tok[:, 0], tok[:, 1])  # trained: the tokens differ per expert


# ----------------------------------------------------------------------------------- reading the routing


def test_mutual_information_of_category_and_chosen_expert():
    cats = torch.arange(4).repeat(25)  # 4 equally likely categories
    assert mutual_information(cats, cats + 3) == pytest.approx(2.0)  # expert determined by category
    assert mutual_information(cats, torch.zeros_like(cats)) == pytest.approx(0.0)  # one expert for all
    independent = torch.arange(4).repeat_interleave(4).repeat(4), torch.arange(4).repeat(16)
    assert mutual_information(*independent) == pytest.approx(0.0, abs=1e-12)
    assert entropy_bits(cats) == pytest.approx(2.0) and mutual_information(cats[:0], cats[:0]) == 0.0


def test_tag_choices_and_explain_lines_follow_the_prior():
    g = generator(tag_routing=True).eval()
    source = StubSource()
    caps = ["red hair, forest, from above", "blue eyes, zxcv", ""]
    cats, choice, rows = tag_choices(g.condition, lambda c: caption_inputs(source, c, "cpu"), caps)
    assert cats.tolist() == caption_categories(caps[0]) + caption_categories(caps[1])  # the null tag left out
    assert rows.shape == (5, E) and torch.allclose(rows.sum(-1), torch.ones(5), atol=1e-5)
    assert torch.equal(choice[cats != OTHER_INDEX], cats[cats != OTHER_INDEX])  # the prior wins at init
    text = describe_tag_routing(split_tags(caps[0]), rows[:3], EXPERT_NAMES)
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].split()[:4] == ["red", "hair", "[color]", "→"]
    assert lines[0].split()[4] == "color" and "[camera]" in lines[2]


def test_explain_prints_the_per_tag_routing():
    from moas.inference.pipeline import Pipeline

    g = generator(tag_routing=True)
    pipe = Pipeline(g, StubSource(), DiffusionConfig(), torch.device("cpu"))
    out = pipe.explain("red hair, forest")
    assert "Per-tag routing" in out
    assert any(line.split()[:3] == ["red", "hair", "[color]"] for line in out.splitlines())
    plain = Pipeline(generator(), StubSource(), DiffusionConfig(), torch.device("cpu"))
    assert "Per-tag routing" not in plain.explain("red hair")
