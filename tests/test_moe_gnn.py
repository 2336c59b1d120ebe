"""EnhancedMoE (batched experts, router, stats, load balance), continuous learning and EnhancedGNN v1–v4."""

from __future__ import annotations

import pytest
import torch

from moas.models.expert_agents import BatchedExperts, EnhancedExpertAgent
from moas.models.gnn import EnhancedGNN
from moas.models.moe import EXPERT_NAMES, EnhancedMoE, describe_routing
from moas.train.adaptive import AdvancedContinuousLearning


def small_moe(**kw) -> EnhancedMoE:
    return EnhancedMoE(
        in_dim=48, dim=32, router_hidden=(40, 24), expert_heads=4, cross_heads=4, context_dim=48, **kw
    )


def test_original_sizes_by_default():
    moe = EnhancedMoE()
    assert [m.out_features for m in moe.router if isinstance(m, torch.nn.Linear)] == [1024, 512, 14]
    assert moe.router[0].in_features == 768
    assert moe.experts.in_w.shape == (14, 512, 768)
    assert moe.cross_attention.num_heads == 16
    assert [m.out_features for m in moe.fusion if isinstance(m, torch.nn.Linear)] == [2048, 1024, 512]
    assert moe.fusion[0].in_features == 512 * 14
    assert moe.names == EXPERT_NAMES and len(EXPERT_NAMES) == 14
    agent = EnhancedExpertAgent()
    assert agent.input_proj.in_features == 768 and agent.attention.num_heads == 8


def test_moe_shapes_routing_rows_and_temperature_gradient():
    moe = small_moe()
    x, ctx = torch.randn(5, 48), torch.randn(5, 7, 48)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[0, 3:] = False
    out = moe(x, ctx, mask)
    assert out["moe_output"].shape == (5, 32)
    assert out["expert_states"].shape == (5, 14, 32)
    assert out["routing"].shape == (5, 14)
    assert torch.allclose(out["routing"].sum(-1), torch.ones(5), atol=1e-6)
    assert (out["routing"] > 0).all()
    (out["moe_output"].pow(2).mean() + out["balance_loss"]).backward()
    assert moe.temperature.grad is not None and moe.temperature.grad.abs().item() > 0


@pytest.mark.parametrize("with_context", [True, False])
def test_batched_experts_equal_the_per_expert_loop(with_context):
    experts = BatchedExperts(14, in_dim=48, dim=32, heads=4).eval()
    with torch.no_grad():  # non-trivial values everywhere, so every slot is checked
        for p in experts.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    agents = [experts.agent(i).eval() for i in range(14)]
    x = torch.randn(3, 48)
    ctx = torch.randn(3, 6, 32) if with_context else None
    mask = (
        torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
        if with_context
        else None
    )
    batched = experts(x, ctx, mask)  # (3, 14, 32)
    loop = torch.stack([a(x, ctx, mask) for a in agents], 1)
    assert torch.allclose(batched, loop, atol=1e-5), (batched - loop).abs().max()
    # And back: loading agents into a fresh batch module reproduces the same outputs.
    fresh = BatchedExperts(14, in_dim=48, dim=32, heads=4).eval()
    for i, a in enumerate(agents):
        fresh.load_agent(i, a)
    assert torch.allclose(fresh(x, ctx, mask), batched, atol=1e-6)


def test_batched_experts_train_mode_without_dropout_matches_too():
    experts = BatchedExperts(14, in_dim=16, dim=16, heads=2, dropout=0.0).train()
    agents = [experts.agent(i).train() for i in range(14)]
    x, ctx = torch.randn(2, 16), torch.randn(2, 4, 16)
    loop = torch.stack([a(x, ctx) for a in agents], 1)
    assert torch.allclose(experts(x, ctx), loop, atol=1e-5)


def test_expert_stats_are_tracked():
    moe = small_moe()
    for _ in range(3):
        moe(torch.randn(4, 48))
    stats = moe.expert_stats()
    assert list(stats) == list(EXPERT_NAMES)
    s = stats["line_art"]
    assert s["call_count"] == 12  # 3 calls × 4 samples; every expert sees every sample
    assert s["avg_time"] > 0
    assert 0.0 <= s["success_rate"] <= 1.0
    assert len(moe.routing_history) == 3 and moe.routing_history.maxlen == 1000
    assert moe.recent_routing(1).shape == (2, 14)
    # An expert the router never uses loses success rate.
    with torch.no_grad():
        moe.balance_bias[0] = -30.0
    for _ in range(20):
        moe(torch.randn(4, 48))
    assert moe.expert_stats()["line_art"]["success_rate"] < 0.2 < moe.expert_stats()["color"]["success_rate"]
    text = describe_routing(moe.route(torch.randn(1, 48))[0])
    assert len(text.splitlines()) == 14 and "line_art" in text


def test_load_balance_loss_is_zero_when_even_and_pushes_towards_balance():
    moe = small_moe()
    even = torch.full((6, 14), 1 / 14)
    assert moe.load_balance_loss(even).abs().item() < 1e-6
    skewed = torch.softmax(torch.randn(6, 14) * 3, -1).requires_grad_(True)
    loss = moe.load_balance_loss(skewed)
    assert loss.item() > 0.1
    loss.backward()
    busiest = skewed.mean(0).argmax()
    idlest = skewed.mean(0).argmin()
    assert skewed.grad[:, busiest].mean() > skewed.grad[:, idlest].mean()  # descent lowers the busiest


def test_continuous_learning_moves_bias_against_the_load_and_reweights_experts():
    moe = small_moe()
    cl = AdvancedContinuousLearning(rate=0.5, weight_rate=0.5)
    with torch.no_grad():
        moe.balance_bias[3] = 4.0  # expert 3 takes most of the load
    for _ in range(5):
        moe(torch.randn(8, 48))
    load_before = moe.mean_routing()
    assert load_before.argmax() == 3
    moe.success_rate[5] = 0.1  # pretend expert 5 performs badly
    w5 = float(moe.experts.expert_weights[5].detach())
    report = cl.update(moe)
    assert report["load"][3] == pytest.approx(float(load_before[3]), rel=1e-5)
    assert moe.balance_bias[3] < 4.0 - 0.4  # moved down by ~rate
    assert float(moe.experts.expert_weights[5].detach()) < w5
    for _ in range(5):
        moe(torch.randn(8, 48))
    assert moe.recent_routing(moe.routing_calls - 5).mean(0)[3] < load_before[3]
    assert cl.update(small_moe()) == {}  # nothing recorded → nothing changes


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_every_gnn_version_runs_forward_and_backward(version):
    gnn = EnhancedGNN(version, in_dim=24, dim=32, num_layers=3, num_nodes=14, heads=4)
    nodes = torch.randn(3, 14, 24, requires_grad=True)
    out = gnn(nodes)
    assert out["graph_features"].shape == (3, 32) and out["node_features"].shape == (3, 14, 32)
    out["graph_features"].pow(2).sum().backward()
    assert nodes.grad.abs().sum() > 0
    assert all(p.grad is not None for p in gnn.parameters() if p.requires_grad)
    has_attention = any(isinstance(m, torch.nn.MultiheadAttention) for m in gnn.modules())
    assert has_attention == (version == 4)
    assert hasattr(gnn.layers[0], "edge_logits") == (version in (2, 3))


def test_gnn_defaults_and_residual_difference():
    gnn = EnhancedGNN()
    assert (
        len(gnn.layers) == 6 and gnn.node_embedding.in_features == 768 and gnn.output_proj.out_features == 512
    )
    assert gnn.layers[0].attention.num_heads == 8
    torch.manual_seed(0)
    v2 = EnhancedGNN(2, 8, 8, 1, 4, 2, dropout=0.0).eval()
    torch.manual_seed(0)
    v3 = EnhancedGNN(3, 8, 8, 1, 4, 2, dropout=0.0).eval()
    v3.load_state_dict(v2.state_dict())  # same weights; only the residual differs
    x = torch.randn(2, 4, 8)
    h = v2.node_embedding(x)
    agg = v2.layers[0].adjacency(4, h)
    msg = v2.layers[0].linear(torch.einsum("ij,bjd->bid", agg, h))
    assert torch.allclose(v2(x)["node_features"], torch.relu(v2.layers[0].norm(msg)), atol=1e-6)
    assert torch.allclose(v3(x)["node_features"], torch.relu(v3.layers[0].norm(h + msg)), atol=1e-6)
    with pytest.raises(ValueError):
        EnhancedGNN(5)


def test_gnn_inference_cache_hits_and_invalidates():
    from moas.resources import L3CacheManager

    gnn = EnhancedGNN(4, in_dim=8, dim=16, num_layers=2, num_nodes=14, heads=4).eval()
    x = torch.randn(2, 14, 8)
    with torch.no_grad():
        plain = gnn(x)
        gnn.cache = L3CacheManager()
        first, second = gnn(x), gnn(x)
        assert gnn.cache.hits == 2 and gnn.cache.misses == 2  # graph + nodes, missed then hit
        assert torch.equal(first["graph_features"], plain["graph_features"])
        assert torch.equal(second["node_features"], plain["node_features"])
        gnn.output_proj.weight.add_(1.0)  # an in-place weight change (e.g. an EMA update)
        changed = gnn(x)
        assert not torch.equal(changed["graph_features"], plain["graph_features"])
    out = gnn.train()(x)  # training with gradients never reads or fills the cache
    assert out["graph_features"].requires_grad and len(gnn.cache) == 4
