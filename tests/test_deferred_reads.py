"""``train.read_every`` > 1: the guard decides on the device and the step's values are read in batches.

What must hold: the same weights as reading every step (the reads move, not what is learned); one host read
per ``read_every`` steps; a non-finite step's update skipped on the device — weights, optimizer moments and
EMA untouched — and accounted for at the next read; a network stuck on non-finite losses still stopped."""

from __future__ import annotations

import pytest
import torch

from moas.checkpoint import load_checkpoint
from moas.errors import MoasError
from moas.train.loop import train
from moas.train.rotation import find_latest_checkpoint
from moas.train.trained_net import EMA, StateKeys, TrainedNet, adamw, grad_scaler

from .conftest import tiny, weights
from .test_host_syncs import (
    HOST_DRAWN,
    MEASURING,
    SIDE_KNOWN,
    SIDE_OFF,
    STEP_READ,
    count_inside,
    count_reads,
)

LEDGER_READ = "train/deferred.py:read"


def _net(deferred: bool) -> TrainedNet:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    opt = adamw(module.parameters(), lr=1e-2, amsgrad=True)
    assert opt.defaults.get("fused"), "the deferred guard needs torch's fused AdamW"
    net = TrainedNet(
        "net",
        module,
        opt,
        grad_scaler(torch.device("cpu"), None),
        StateKeys("m", "o", "s"),
        max_grad_norm=1.0,
        ema=EMA(module, 0.9),
    )
    net.deferred = deferred
    return net


def _step(net: TrainedNet, x: torch.Tensor, poison: bool) -> None:
    loss = net.module(x).pow(2).mean()
    if poison:
        loss = loss * float("nan")
    net.backward(loss)
    net.apply(torch.isfinite(loss))


def _snapshot(net: TrainedNet) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in net.module.parameters()]
    out += [p.detach().clone() for p in net.ema.model.parameters()]
    for state in net.opt.state.values():
        out += [v.clone() for v in state.values()]
    return out


def test_a_non_finite_step_is_skipped_on_the_device_and_counted_when_read():
    net = _net(deferred=True)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    _step(net, x, poison=False)
    before = _snapshot(net)
    reads = []
    real = torch.Tensor.tolist
    torch.Tensor.tolist = lambda self: reads.append(1) or real(self)
    try:
        _step(net, x, poison=True)  # no host read: the fused kernel skips on the flag
    finally:
        torch.Tensor.tolist = real
    assert not reads
    after = _snapshot(net)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # weights, EMA, moments
    assert [bool(f) for f in net.pending] == [True, False]
    net.settle([True, False])
    assert net.skipped == 1 and net.in_a_row == 1 and not net.pending
    _step(net, x, poison=False)
    assert not torch.equal(after[0], net.module[0].weight)


def test_deferred_steps_learn_what_host_decided_steps_learn():
    """Finite steps: the same weights, moments and EMA bit for bit as the host-decided guard."""
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    nets = [_net(deferred=False), _net(deferred=True)]
    for net in nets:
        for _ in range(5):
            _step(net, x, poison=False)
    host, device = (_snapshot(n) for n in nets)
    assert all(torch.equal(a, b) for a, b in zip(host, device, strict=True))


def test_a_run_reads_the_device_once_per_read_every_steps_and_learns_the_same(
    tmp_path, demo_dir, monkeypatch
):
    ref = train(tiny(tmp_path / "ref", demo_dir / "train", SIDE_OFF, max_steps=6), progress=False)
    active = [False]
    reads = count_reads(monkeypatch, active)
    count_inside(monkeypatch, ("_micro_step", "_optimizer_step", "_report_step"), active)
    cfg = tiny(tmp_path / "late", demo_dir / "train", SIDE_OFF, max_steps=6, read_every=3)
    late = train(cfg, progress=False)
    assert late.global_step == 6 and late.skipped_steps == 0
    assert reads[LEDGER_READ] == 2 and not reads[STEP_READ]  # steps 3 and 6, nothing per step
    others = {k: v for k, v in reads.items() if k != LEDGER_READ and k not in HOST_DRAWN | MEASURING}
    assert not others, others
    assert late.final_loss == ref.final_loss
    a = weights(find_latest_checkpoint(tmp_path / "ref" / "ckpt"))
    b = weights(find_latest_checkpoint(tmp_path / "late" / "ckpt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_skipped_step_is_logged_late_and_saved_settled(tmp_path, demo_dir, monkeypatch, caplog):
    monkeypatch.setenv("MOAS_INJECT", "nan_loss@3")  # the second step's first micro-batch
    cfg = tiny(tmp_path, demo_dir / "train", SIDE_OFF, max_steps=4, read_every=3)
    r = train(cfg, progress=False)
    assert r.skipped_steps == 1 and r.global_step == 4  # a skipped step still counts as a step here
    assert "Non-finite loss or gradient at step 2; its update was skipped." in caplog.text
    saved = load_checkpoint(tmp_path / "ckpt" / "checkpoint_00000004.pt")
    assert saved["skipped_steps"] == 1


def test_a_generator_stuck_on_non_finite_losses_is_stopped_at_a_read(tmp_path, demo_dir, monkeypatch):
    from moas.train.faults import FaultInjector

    monkeypatch.setattr(FaultInjector, "fires", lambda self, kind: kind == "nan_loss")
    cfg = tiny(tmp_path, demo_dir / "train", SIDE_OFF, epochs=5, grad_accum_steps=1, read_every=4)
    with pytest.raises(MoasError, match="generator's loss or gradient was not finite for 20 steps in a row"):
        train(cfg, progress=False)


def test_side_networks_and_fp16_scalers_defer_their_reads_too(tmp_path, demo_dir, monkeypatch):
    """The discriminator, enhancer and super-resolution stage decide on the device as well (under fp16 the
    GradScaler hands each fused step its own overflow flag): the run's only reads are the ledger's."""
    active = [False]
    reads = count_reads(monkeypatch, active)
    count_inside(monkeypatch, ("_micro_step", "_optimizer_step", "_report_step", "_side_steps"), active)
    on = {
        "monitor": {"measure_every": 1000},
        "losses": {"adversarial": True, "disc_warmup_steps": 0},
        "sr": {"train": True, "every": 1},
    }
    cfg = tiny(tmp_path, demo_dir / "train", on, max_steps=4, read_every=2, mixed_precision="fp16")
    r = train(cfg, progress=False)
    assert r.global_step == 4
    assert reads[LEDGER_READ] == 2 and not reads[STEP_READ], reads
    others = {
        k: v for k, v in reads.items() if k != LEDGER_READ and k not in HOST_DRAWN | MEASURING | SIDE_KNOWN
    }
    assert not others, others


def test_an_emergency_save_goes_on_when_the_pending_values_cannot_be_read(tmp_path, demo_dir, monkeypatch):
    """After some device errors nothing on the device can be read: the emergency checkpoint is written
    anyway (with the skip counters as last read), and the original error is what the run ends with."""
    from moas.train.deferred import StepLedger

    def broken(self):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(StepLedger, "read", broken)
    cfg = tiny(tmp_path, demo_dir / "train", SIDE_OFF, max_steps=6, read_every=100)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        train(cfg, progress=False)
    saved = sorted((tmp_path / "ckpt").glob("emergency_*.pt"))
    assert saved and load_checkpoint(saved[0])["global_step"] == 3
