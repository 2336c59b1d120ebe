"""The trainer's AdamW: fused where torch supports it, the same update as the default implementation, and a
saved state loads into either implementation."""

from __future__ import annotations

import copy

import torch

from moas.train.trained_net import adamw, load_optimizer_state


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_fused_adamw_matches_the_default_update():
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.01, "eps": 1e-8, "amsgrad": True}
    a, b = _model(), _model()
    fast, plain = adamw(a.parameters(), **kw), torch.optim.AdamW(b.parameters(), **kw)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
        assert fast.param_groups[0]["fused"] is True  # the CPU has a fused kernel since torch 2.4
    _train(a, fast, 6)
    _train(b, plain, 6)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_state_saved_by_one_implementation_resumes_in_the_other():
    kw = {"lr": 1e-2, "amsgrad": True}
    a = _model()
    plain = torch.optim.AdamW(a.parameters(), **kw)
    _train(a, plain, 3)
    saved = copy.deepcopy(plain.state_dict())  # as read back from a checkpoint file: not shared

    b = _model()
    b.load_state_dict(a.state_dict())
    fast = adamw(b.parameters(), **kw)
    own = fast.param_groups[0].get("fused")
    load_optimizer_state(fast, saved)
    assert fast.param_groups[0].get("fused") == own  # this machine's choice, not the writer's
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        torch.testing.assert_close(fast.state[b[0].weight][key], plain.state[a[0].weight][key])
    _train(a, plain, 2, seed=7)
    _train(b, fast, 2, seed=7)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
