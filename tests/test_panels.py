"""Panels: the memory expert's gated memory attention, PanelMemory, the temporal loss,
sequences in the data and the demo generator. The end-to-end run is in test_panels_e2e.py."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from moas.data.dataset import ArtDataset, panel_links, smart_collate_fn
from moas.eval.validate import split_holdout
from moas.losses.temporal import TemporalConsistencyLoss, sequence_metrics, temporal_terms
from moas.models.expert_agents import BatchedExperts
from moas.models.generator import MoasGenerator
from moas.models.moe import EXPERT_NAMES
from moas.models.panel_memory import PanelMemory
from moas.models.upgrade import upgrade_model_args
from moas.train.sequences import memory_keep

from .test_brain import TEXT, UNET, text_batch, tiny_brain

MEM = EXPERT_NAMES.index("memory")


def _experts(seed: int = 0) -> BatchedExperts:
    torch.manual_seed(seed)
    return BatchedExperts(14, 48, 32, 4, 0.1, memory_expert=MEM).eval()


def test_zero_gate_is_bit_identical_and_a_set_gate_changes_only_the_memory_expert():
    ex = _experts()
    x, ctx = torch.randn(3, 48), torch.randn(3, 5, 32)
    mem, mask = torch.randn(3, 2, 32), torch.tensor([[True, True], [True, False], [False, True]])
    base = ex(x, ctx)
    assert torch.equal(ex(x, ctx, None, mem, mask), base)  # gate 0: exactly unchanged
    with torch.no_grad():
        ex.memory_gate.fill_(0.8)
    out = ex(x, ctx, None, mem, mask)
    others = [i for i in range(14) if i != MEM]
    assert torch.equal(out[:, others], base[:, others])
    assert (out[:, MEM] - base[:, MEM]).abs().amax(-1).min() > 1e-4  # every row has a real panel


def test_all_masked_rows_get_no_memory_and_stay_finite():
    ex = _experts().train()
    with torch.no_grad():
        ex.memory_gate.fill_(1.0)
    ex.dropout = 0.0  # compare deterministically
    x, mem = torch.randn(2, 48), torch.randn(2, 3, 32, requires_grad=True)
    mask = torch.tensor([[False, False, False], [True, False, True]])
    out = ex(x, None, None, mem, mask)
    base = ex(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], base[0]) and not torch.equal(out[1], base[1])
    out.sum().backward()
    assert torch.isfinite(mem.grad).all() and mem.grad[0].abs().sum() == 0 and mem.grad[1, 1].abs().sum() == 0
    assert ex.memory_gate.grad is not None and ex.memory_gate.grad.abs() > 0


def test_memory_built_experts_still_match_the_per_expert_reference():
    ex = _experts()
    x, ctx = torch.randn(2, 48), torch.randn(2, 4, 32)
    out = ex(x, ctx)
    for i in (0, MEM, 13):
        assert torch.allclose(ex.agent(i).eval()(x, ctx), out[:, i], atol=1e-5)


def test_panel_memory_tokens_and_absent_panels():
    torch.manual_seed(0)
    pm = PanelMemory(dim=32, channels=(8, 8, 16, 16), max_distance=2).eval()
    assert pm(None, None) == {"memory": None, "memory_mask": None}
    assert (
        pm(torch.zeros(2, 0, 3, 16, 16, dtype=torch.uint8), torch.zeros(2, 0, dtype=torch.bool))["memory"]
        is None
    )
    imgs = torch.randint(0, 256, (2, 3, 3, 16, 16), dtype=torch.uint8)
    assert pm(imgs, torch.zeros(2, 3, dtype=torch.bool))["memory"] is None  # nothing to encode
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = pm(imgs, mask)
    assert out["memory"].shape == (2, 3, 32) and torch.equal(out["memory_mask"], mask)
    # A padded slot's pixels do not matter; a real slot's do; distance embeddings separate slots.
    noisy = imgs.clone()
    noisy[1, 1:] = 0
    again = pm(noisy, mask)["memory"]
    assert torch.allclose(again[1, 0], out["memory"][1, 0]) and torch.allclose(again[0], out["memory"][0])
    same = imgs[:, :1].expand(-1, 3, -1, -1, -1)
    tok = pm(same, torch.ones(2, 3, dtype=torch.bool))["memory"]
    assert not torch.allclose(tok[:, 0], tok[:, 1]) and torch.allclose(tok[:, 1], tok[:, 2])  # clamped at 2
    floats = pm(imgs.float() / 127.5 - 1, mask)["memory"]
    assert torch.allclose(floats, out["memory"], atol=1e-5)  # uint8 and [-1, 1] inputs agree


def test_panel_memory_encodes_the_same_panels_once_at_inference():
    from moas.resources import L3CacheManager

    torch.manual_seed(0)
    pm = PanelMemory(dim=32, channels=(8, 8, 16, 16), max_distance=2).eval()
    calls = []
    pm.vision.register_forward_hook(lambda *_: calls.append(1))
    imgs = torch.randint(0, 256, (2, 2, 3, 16, 16), dtype=torch.uint8)
    mask = torch.ones(2, 2, dtype=torch.bool)
    plain = pm(imgs, mask)["memory"]
    pm.cache = L3CacheManager()
    with torch.no_grad():
        first, second = pm(imgs, mask)["memory"], pm(imgs, mask)["memory"]  # two sampler steps
        assert len(calls) == 2 and pm.cache.hits == 1  # the second step reused the encoding
        assert torch.equal(first, second) and torch.allclose(first, plain)
        other = imgs.clone()
        other[0, 0] = 0
        assert not torch.equal(pm(other, mask)["memory"], first) and len(calls) == 3  # new panels: encoded
        pm.proj.weight.add_(1.0)  # changed weights never return a stale encoding
        assert not torch.equal(pm(imgs, mask)["memory"], first) and len(calls) == 4


def test_generator_passes_panels_and_old_model_args_load_without_panel_memory():
    torch.manual_seed(0)
    g = MoasGenerator(16, UNET, TEXT, brain=tiny_brain()).eval()
    assert g.panel_memory and g.stage("panel_memory") is not None
    text = text_batch(2)
    panels = {"panel_images": torch.randint(0, 256, (2, 1, 3, 16, 16), dtype=torch.uint8)}
    panels["panel_mask"] = torch.ones(2, 1, dtype=torch.bool)
    with torch.no_grad():
        base = g.condition(text)["expert_states"]
        assert torch.equal(g.condition(text | panels)["expert_states"], base)  # gate 0
        g.stage("moe").experts.memory_gate.fill_(0.5)
        assert not torch.equal(g.condition(text | panels)["expert_states"][:, MEM], base[:, MEM])
    # A model file from before panel memory: its brain arguments have no panel_memory key.
    old_brain = {k: v for k, v in tiny_brain().items() if not k.startswith("panel_")}
    old = MoasGenerator(
        **upgrade_model_args({"resolution": 16, "model": UNET, "text": TEXT, "brain": old_brain})
    )
    assert not old.panel_memory and old.stage("panel_memory") is None
    assert not any("mem" in k for k in old.state_dict() if "experts." in k)
    rebuilt = MoasGenerator(**upgrade_model_args({**old.init_args, "brain": old_brain}))
    rebuilt.load_state_dict(old.state_dict())  # strict: the old weights fit
    out = rebuilt.eval()(torch.randn(2, 3, 16, 16), torch.tensor([3, 500]), text | panels)  # panels ignored
    assert out.pred.shape == (2, 3, 16, 16)
    assert MoasGenerator(**g.init_args).stage("panel_memory") is not None  # new files keep it


def test_memory_bridge_is_exact_at_init_then_carries_the_panels_into_pooled():
    torch.manual_seed(0)
    g = MoasGenerator(16, UNET, TEXT, brain=tiny_brain()).eval()
    bridge = g.stage("memory_bridge")
    assert bridge is not None
    text = text_batch(2)
    panels = {"panel_images": torch.randint(0, 256, (2, 1, 3, 16, 16), dtype=torch.uint8)}
    panels["panel_mask"] = torch.tensor([[True], [False]])  # row 1 has no previous panel
    with torch.no_grad():
        base = g.condition(text)["pooled"]
        assert torch.equal(g.condition(text | panels)["pooled"], base)  # zero-initialised: exact no-op
    # The zero-initialised projection still gets a gradient at once (its input is non-zero).
    g.condition(text | panels)["pooled"].pow(2).sum().backward()
    assert bridge.proj.weight.grad is not None and bridge.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.nn.init.normal_(bridge.proj.weight, std=0.1)
        pooled = g.condition(text | panels)["pooled"]
    assert not torch.allclose(pooled[0], base[0])  # the panel reaches the pooled conditioning
    assert torch.equal(pooled[1], base[1])  # a row without panels gets nothing
    old = {k: v for k, v in tiny_brain().items() if k != "memory_pooled"}  # a file from before the bridge
    old_args = upgrade_model_args({"resolution": 16, "model": UNET, "text": TEXT, "brain": old})
    assert MoasGenerator(**old_args).stage("memory_bridge") is None


def test_memory_bridge_reaches_the_first_cross_attention_token_and_nothing_else():
    torch.manual_seed(0)
    g = MoasGenerator(16, UNET, TEXT, brain=tiny_brain()).eval()
    bridge = g.stage("memory_bridge")
    assert bridge.context_proj is not None and not bridge.context_proj.weight.any()
    text = text_batch(2)
    panels = {"panel_images": torch.randint(0, 256, (2, 1, 3, 16, 16), dtype=torch.uint8)}
    panels["panel_mask"] = torch.tensor([[True], [False]])  # row 1 has no previous panel
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 500])
    with torch.no_grad():
        base = g.condition(text)["context"]
        assert torch.equal(g.condition(text | panels)["context"], base)  # zero-initialised: exact
        assert torch.equal(g(x, t, text | panels).pred, g(x, t, text).pred)
    g.condition(text | panels)["context"][:, 0].pow(2).sum().backward()
    assert bridge.context_proj.weight.grad.abs().sum() > 0  # trainable from the first step
    with torch.no_grad():
        torch.nn.init.normal_(bridge.context_proj.weight, std=0.1)
        bridge.proj.weight.zero_()  # only the context route open
        ctx = g.condition(text | panels)["context"]
        assert not torch.allclose(ctx[0, 0], base[0, 0])  # the panel reaches token 0 of its row
        assert torch.equal(ctx[0, 1:], base[0, 1:]) and torch.equal(ctx[1], base[1])  # and nothing else
        assert not torch.equal(g(x, t, text | panels).pred[0], g(x, t, text).pred[0])  # the U-Net reads it
    old = {k: v for k, v in tiny_brain().items() if k != "memory_context"}  # a file from before the route
    old_args = upgrade_model_args({"resolution": 16, "model": UNET, "text": TEXT, "brain": old})
    old_bridge = MoasGenerator(**old_args).stage("memory_bridge")
    assert old_bridge is not None and old_bridge.context_proj is None


# ---------------------------------------------------------------------------------------------- temporal loss


def _scene(centre: tuple[float, float, float], border: tuple[float, float, float]) -> torch.Tensor:
    img = torch.tensor(border).view(1, 3, 1, 1).expand(1, 3, 32, 32).clone()
    img[..., 8:24, 8:24] = torch.tensor(centre).view(1, 3, 1, 1)
    return img


def test_temporal_terms_separate_character_and_scene():
    a = _scene((0.8, -0.5, -0.5), (-0.6, 0.4, -0.2))
    assert all(v.item() < 1e-3 for v in temporal_terms(a, a).values())
    other_char = _scene((-0.5, -0.5, 0.9), (-0.6, 0.4, -0.2))  # same background, another character
    other_bg = _scene((0.8, -0.5, -0.5), (0.7, 0.7, 0.2))  # same character, another background
    t_char, t_bg = temporal_terms(a, other_char), temporal_terms(a, other_bg)
    assert t_char["character"] > 0.3 and t_char["scene"] < 0.05
    assert t_bg["scene"] > 0.3 and t_bg["character"] < 0.05
    assert t_char["feature"] > 0.01 and t_bg["feature"] > 0.01
    noise = torch.rand(4, 3, 32, 32) * 2 - 1
    assert (temporal_terms(noise, noise.flip(0))["feature"] > 0).all()


def test_temporal_loss_weights_gradient_and_nan_guard():
    torch.manual_seed(0)
    prev = torch.rand(3, 3, 16, 16) * 2 - 1
    pred = (torch.rand(3, 3, 16, 16) * 2 - 1).requires_grad_(True)
    loss = TemporalConsistencyLoss(0.3, 0.2)
    res = loss(pred, prev)
    terms = temporal_terms(pred.detach(), prev)
    expected = 0.5 * terms["feature"].mean() + 0.3 * terms["character"].mean() + 0.2 * terms["scene"].mean()
    assert torch.allclose(res.total, expected, atol=1e-6)
    res.total.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # Samples with weight 0 (no previous panel) contribute nothing.
    w = torch.tensor([1.0, 0.0, 0.0])
    only_first = loss(pred.detach(), prev, sample_weight=w).total
    assert torch.allclose(only_first, loss(pred.detach()[:1], prev[:1]).total / 3, atol=1e-6)
    bad = pred.detach().clone()
    bad[0, 0, 0, 0] = float("nan")
    guarded = loss(bad, prev)
    assert set(guarded.bad) == {"feature", "character", "scene"} and guarded.total.item() == 0.0


def test_sequence_metrics_pairs_and_mean():
    a = _scene((0.8, -0.5, -0.5), (-0.6, 0.4, -0.2))
    b = _scene((-0.5, -0.5, 0.9), (-0.6, 0.4, -0.2))
    m = sequence_metrics(torch.cat([a, a, b]))
    assert [p["pair"] for p in m["pairs"]] == [[0, 1], [1, 2]]
    assert m["pairs"][0]["temporal_consistency"] < 1e-3 < m["pairs"][1]["temporal_consistency"]
    mean = (m["pairs"][0]["temporal_consistency"] + m["pairs"][1]["temporal_consistency"]) / 2
    assert m["mean"]["temporal_consistency"] == pytest.approx(mean)
    assert m["weights"] == {"feature": 0.5, "character": 0.3, "scene": 0.2}
    assert sequence_metrics(a)["pairs"] == [] and sequence_metrics(a)["mean"] == {}


# --------------------------------------------------------------------------------------------------- data


def test_panel_links_follow_numbers_per_folder():
    names = ["a/ch1_p10.png", "a/ch1_p2.png", "a/ch1_p01.png", "b/ch1_p03.png", "a/x.png", "a/ch2_p1.png"]
    assert panel_links([Path(n) for n in names]) == (1, 2, -1, -1, -1, -1)


def _write_sequence_folder(root: Path) -> None:
    from PIL import Image

    (root / "s").mkdir(parents=True)
    for i, name in enumerate(["ch_p1", "ch_p2", "ch_p3", "solo", "other_p1"]):
        Image.new("RGB", (16, 16), (40 * i, 100, 200 - 30 * i)).save(root / "s" / f"{name}.png")
        (root / "s" / f"{name}.txt").write_text(f"1girl, tag{i}")


def test_dataset_items_carry_previous_panels_nearest_first(tmp_path):
    _write_sequence_folder(tmp_path / "d")
    ds = ArtDataset(tmp_path / "d", 16, tmp_path / "cache", panel_context=2)
    ds.validate(progress=False)
    idx = {p.stem: i for i, p in enumerate(ds.paths)}
    item = ds[idx["ch_p3"]]
    assert item["prev_index"] == idx["ch_p2"] and item["panels"].shape == (2, 3, 16, 16)
    assert torch.equal(item["panels"][0], ds[idx["ch_p2"]]["pixels"])  # nearest first
    assert torch.equal(item["panels"][1], ds[idx["ch_p1"]]["pixels"])
    assert ds[idx["ch_p1"]]["panels"].shape[0] == 0 and ds[idx["solo"]]["prev_index"] == -1
    batch = smart_collate_fn([ds[idx["ch_p2"]], ds[idx["solo"]], ds[idx["ch_p3"]]])
    assert batch["panels"].shape == (3, 2, 3, 16, 16)
    assert batch["panel_mask"].tolist() == [[True, False], [False, False], [True, True]]
    assert "panels" not in smart_collate_fn([ds[idx["solo"]], ds[idx["other_p1"]]])  # no sequences: nothing
    # A hold-out split recomputes the links for its own file list.
    train, val = split_holdout(ds, 0.4, 0, 1)
    for sub in (train, val):
        for i, p in enumerate(sub.paths):
            j = sub.prev_indices()[i]
            assert j == -1 or (sub.paths[j].stem[:-1] == p.stem[:-1] and sub.paths[j].stem < p.stem)
    plain = ArtDataset(tmp_path / "d", 16, tmp_path / "cache")
    assert "panels" not in plain[0]


def test_memory_is_dropped_with_the_text():
    keep = memory_keep(torch.tensor([False, True, False, False]), ["a", "", "", ""], ["a", "b", "c", ""])
    assert keep.tolist() == [True, False, False, True]


def test_demo_sequences_leave_the_ordinary_images_unchanged(tmp_path):
    from moas.data.synthetic import generate_demo_dataset, held_out_pairs

    plain = generate_demo_dataset(tmp_path / "a", n_images=6, size=32, seed=1, progress=False)
    seq = generate_demo_dataset(tmp_path / "b", n_images=6, size=32, seed=1, progress=False, sequences=3)
    assert plain["images"] == seq["images"] and "sequences" not in plain
    for entry in plain["images"]:
        assert (tmp_path / "a" / entry["file"]).read_bytes() == (tmp_path / "b" / entry["file"]).read_bytes()
    held = set(held_out_pairs(1))
    assert len(seq["sequences"]) == 3
    for s in seq["sequences"]:
        assert 3 <= len(s["panels"]) <= 4 and (s["hair_color"], s["background"]) not in held
        files = [tmp_path / "b" / p["file"] for p in s["panels"]]
        assert all(f.is_file() for f in files) and panel_links(files)[1:] == tuple(range(len(files) - 1))
    # Regenerating with fewer sequences removes the stale ones.
    generate_demo_dataset(tmp_path / "b", n_images=6, size=32, seed=1, progress=False, sequences=1)
    assert len(list((tmp_path / "b" / "train").rglob("seq*_p*.png"))) == len(seq["sequences"][0]["panels"])


def test_panel_config_fields_are_validated():
    from moas.config import BrainConfig, ConfigError, LossConfig, TrainConfig

    with pytest.raises(ConfigError):
        TrainConfig(panel_context=-1)
    with pytest.raises(ConfigError):
        BrainConfig(panel_channels=[])
    with pytest.raises(ConfigError):
        LossConfig(temporal_weight=-0.1)
    assert asdict(BrainConfig())["panel_memory"] is True


def test_sequence_tag_drop_thins_later_captions_only(tmp_path):
    """--sequence_tag_drop: panels 2.. lose hair/eye colour tags (recorded in the manifest), panel 1 and
    every image stay as they were, and p = 0 is today's output."""
    from moas.data.synthetic import EYE_COLORS, HAIR_COLORS, generate_demo_dataset
    from moas.data.synthetic_panels import colour_tag, drop_tags
    from moas.errors import DataError

    args = {"n_images": 4, "size": 32, "seed": 2, "progress": False, "sequences": 40}
    full = generate_demo_dataset(tmp_path / "full", **args)
    zero = generate_demo_dataset(tmp_path / "zero", **args, sequence_tag_drop=0.0)
    thin = generate_demo_dataset(tmp_path / "thin", **args, sequence_tag_drop=0.5)
    assert zero == full and "sequence_tag_drop" not in full and thin["sequence_tag_drop"] == 0.5
    assert all("kept_tags" not in p for s in full["sequences"] for p in s["panels"])
    kept_counts = {"hair_color": 0, "eye_color": 0}
    later = 0
    for s_full, s_thin in zip(full["sequences"], thin["sequences"], strict=True):
        assert {k: v for k, v in s_full.items() if k != "panels"} == {
            k: v for k, v in s_thin.items() if k != "panels"
        }
        for k, (pf, pt) in enumerate(zip(s_full["panels"], s_thin["panels"], strict=True)):
            f = pf["file"]
            assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "thin" / f).read_bytes()
            txt = pt["file"].replace(".png", ".txt")
            assert (tmp_path / "thin" / txt).read_text(encoding="utf-8") == pt["caption"] + "\n"
            assert (tmp_path / "zero" / txt).read_bytes() == (tmp_path / "full" / txt).read_bytes()
            kept = pt["kept_tags"]
            if k == 0:
                assert kept == {"hair_color": True, "eye_color": True} and pt["caption"] == pf["caption"]
                continue
            later += 1
            dropped = [colour_tag(a, s_full[a]) for a, keep in kept.items() if not keep]
            assert pt["caption"] == drop_tags(pf["caption"], dropped)  # only those tags, order kept
            for a, keep in kept.items():
                assert (colour_tag(a, s_full[a]) in pt["caption"].split(", ")) == keep
                kept_counts[a] += keep
    # ~50% kept of about 40 * 2.5 later panels: far from 0 and from all (binomial sd ~ 5)
    for a, n in kept_counts.items():
        assert 0.3 * later < n < 0.7 * later, (a, n, later)
    # p = 1: no later panel names a colour; out-of-range p is refused.
    allgone = generate_demo_dataset(tmp_path / "one", **args, sequence_tag_drop=1.0)
    for s in allgone["sequences"]:
        for p in s["panels"][1:]:
            tags = set(p["caption"].split(", "))
            assert not tags & ({f"{c} hair" for c in HAIR_COLORS} | {f"{c} eyes" for c in EYE_COLORS})
            assert p["kept_tags"] == {"hair_color": False, "eye_color": False}
    with pytest.raises(DataError):
        generate_demo_dataset(tmp_path / "bad", **args, sequence_tag_drop=1.5)
    with pytest.raises(DataError):
        drop_tags("1girl, red hair", ["blue eyes"])


def test_make_data_cli_passes_the_tag_drop_and_refuses_a_bad_one(tmp_path, monkeypatch, capsys):
    from moas.cli import main
    from moas.errors import MoasError

    monkeypatch.chdir(tmp_path)
    args = ["make-data", "--out", "d", "--n_images", "2", "--size", "16", "--sequences", "3"]
    assert main([*args, "--sequence_tag_drop", "1.0"]) == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["sequence_tag_drop"] == 1.0
    for s in manifest["sequences"]:
        kept = [p["kept_tags"]["hair_color"] for p in s["panels"]]
        assert kept == [True] + [False] * (len(kept) - 1)
        second = s["panels"][1]
        caption = (tmp_path / "d" / second["file"].replace(".png", ".txt")).read_text(encoding="utf-8")
        assert caption.strip() == second["caption"]
        assert f"{s['hair_color']} hair" not in caption.split(", ")
    capsys.readouterr()
    assert main([*args, "--sequence_tag_drop", "-0.1"]) == MoasError("").exit_code
    assert "--sequence_tag_drop must be between 0 and 1" in capsys.readouterr().err
