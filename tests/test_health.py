"""The validation-loss health check: a run that never learns and a run that collapsed are each warned once."""

from __future__ import annotations

import torch

from moas.config import DiffusionConfig
from moas.diffusion.schedule import NoiseSchedule, make_train_scheduler
from moas.monitor.health import COLLAPSE, NOT_LEARNING, LossHealth


def test_a_healthy_run_gets_no_warning():
    h = LossHealth()
    for epoch, (loss, ratio) in enumerate(
        [(0.3, 0.6), (0.2, 0.4), (0.15, 0.3), (0.16, 0.32), (0.12, 0.25)], 1
    ):
        assert h.check(epoch, loss, ratio) is None
    assert h.best == 0.12 and h.best_epoch == 5


def test_not_learning_is_warned_once_from_the_second_validation():
    h = LossHealth()
    assert h.check(1, 1.0, 0.99) is None  # the first validation may come before anything was learned
    message = h.check(2, 0.98, NOT_LEARNING + 0.05)
    assert message is not None and "not learning" in message and "95 %" in message
    assert h.check(3, 0.97, 0.97) is None  # once


def test_a_collapse_after_learning_is_warned_once_with_the_best_epoch():
    h = LossHealth()
    h.check(1, 0.4, 0.5)
    h.check(2, 0.1, 0.2)
    assert h.check(3, 0.19, 0.3) is None  # worse, not collapsed
    message = h.check(4, COLLAPSE * 0.1 + 0.01, 0.6)
    assert message is not None and "collapsed" in message and "epoch 2" in message and "--lr" in message
    assert h.check(5, 0.9, 1.0) is None  # the collapse was already reported; "not learning" adds nothing new
    assert h.check(6, None, None) is None


def test_the_zero_prediction_scale_matches_the_objective_for_every_target():
    # loss_vs_zero divides by the loss of predicting zeros: for that prediction the ratio is exactly 1.
    from moas.diffusion.objective import DiffusionObjective

    class Zeros(torch.nn.Module):
        def forward(self, x, t, text):
            return torch.zeros_like(x), x.new_zeros(())

    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.tensor([10, 200, 500, 900])
    dc = DiffusionConfig()
    for kind in ("epsilon", "v_prediction", "sample"):  # sample: the cascade stage's x-prediction
        s = NoiseSchedule(make_train_scheduler(dc), kind, dc.min_snr_gamma)
        out = DiffusionObjective(s)(Zeros(), x0, {}, t, noise)
        zero = s.target(x0, noise, t).float().pow(2).mean((1, 2, 3)) * s.loss_weight(t)
        torch.testing.assert_close(out.weighted, zero)
