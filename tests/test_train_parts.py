import math

import torch
from torch import nn

from moas.text.bank import TextBank
from moas.train.lr_schedule import WarmupCosineRestarts
from moas.train.saving import milestone_epochs
from moas.train.trained_net import EMA


def _opt(lr=1.0):
    return torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)


def test_warmup_then_cosine_restarts_scaled_to_the_run():
    opt = _opt(1.0)
    # The original: 260 epochs, warm-up 17 % (44 epochs), T_0 = 65, T_mult = 2.
    s = WarmupCosineRestarts(
        opt,
        epochs=260,
        steps_per_epoch=1,
        warmup_fraction=0.17,
        restart_fraction=0.25,
        restart_mult=2,
        eta_min=0.0,
    )
    lrs = [s.get_last_lr()[0]]
    for _ in range(259):
        s.step()
        lrs.append(s.get_last_lr()[0])
    assert s.warmup_steps == 44 and s.cosine.T_0 == 65
    assert math.isclose(lrs[0], 1 / 44) and math.isclose(lrs[43], 1.0)
    assert math.isclose(lrs[44], 1.0)  # cosine starts at the peak
    assert math.isclose(lrs[44 + 65], 1.0)  # first restart after T_0 epochs
    assert lrs[44 + 64] < 0.01
    assert math.isclose(lrs[44 + 65 + 65], 0.5, abs_tol=1e-9)  # halfway through the doubled period


def test_schedule_state_round_trip():
    a = WarmupCosineRestarts(_opt(), 10, 7, 0.1, 1.0, 1, 1e-8)
    for _ in range(23):
        a.step()
    b = WarmupCosineRestarts(_opt(), 10, 7, 0.1, 1.0, 1, 1e-8)
    b.load_state_dict(a.state_dict())
    a.step()
    b.step()
    assert a.get_last_lr() == b.get_last_lr()


def test_ema_warmup_and_decay():
    m = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(m.weight)
    ema = EMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m)  # d = min(0.9, 2/11)
    assert torch.allclose(ema.model.weight, torch.full((2, 2), 1 - 2 / 11))
    for _ in range(200):
        ema.update(m)
    assert torch.allclose(ema.model.weight, torch.ones(2, 2), atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_milestones_scale_with_run_length():
    assert milestone_epochs(260) == {40, 80, 120, 160, 200, 230, 260}
    assert milestone_epochs(26) == {4, 8, 12, 16, 20, 23, 26}
    assert milestone_epochs(12, keep=False) == set()  # train.milestones off (the cpu_tiny demo)


def test_text_bank_pads_and_caches(text_encoder):
    bank = TextBank(text_encoder, ["1girl, red hair", "1girl, blue eyes, forest"], progress=False)
    assert "" in bank.entries  # the null prompt is always there
    b = bank.batch(["1girl, red hair", "1girl, blue eyes, forest", ""])
    assert b["tags"].shape[:2] == b["tag_mask"].shape and b["tag_mask"].sum(1)[:2].tolist() == [2, 3]
    direct = text_encoder.encode(["1girl, blue eyes, forest"])
    n = int(direct.mask.sum())
    assert torch.allclose(b["tokens"][1, :n], direct.tokens[0, :n], atol=1e-2)  # float16 storage
    bank.batch(["new caption"])
    assert "new caption" in bank.entries
