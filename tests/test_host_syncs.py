"""Host reads in the generator's hot path: on a GPU each ``.item()``, ``float(t)``, ``bool(t)``,
``.tolist()`` or ``.cpu()`` of a device tensor waits for the GPU to finish. The step reads the device once
per optimizer step (the guard's finite check, with the loss, the gradient norm and the loss terms in the
same transfer), not once per value and micro-batch.

Counted on the CPU, where every tensor is a host tensor, by call site: over the micro-steps, optimizer steps
and reports of a short run (the side networks off: their steps have reads of their own), every read must
come from an allowed place — the step's one read, the random numbers the loop draws on the host, and the
monitor's measurement at its steps (the first, then every ``monitor.measure_every``)."""

from __future__ import annotations

import traceback
from collections import Counter

import torch

from moas.train import step as step_mod
from moas.train.loop import train
from moas.train.trained_net import TrainedNet

from .conftest import tiny

READS = ("item", "tolist", "cpu", "__float__", "__bool__", "__int__")
SIDE_OFF = {"enhance": {"train": False}, "sr": {"train": False}, "monitor": {"measure_every": 1000}}
STEP_READ = "train/trained_net.py:host_read"
HOST_DRAWN = {"train/inputs.py:__call__", "train/sequences.py:memory_keep"}  # the step's draws: on the CPU
MEASURING = {"eval/metrics.py:art_measurements", "monitor/run_monitor.py:observe_batch"}


def site() -> str:
    """The innermost moas function on the stack, as ``path:function``."""
    frames = [f for f in traceback.extract_stack()[:-2] if "/moas/" in f.filename]
    return f"{frames[-1].filename.split('/moas/', 1)[1]}:{frames[-1].name}" if frames else "?"


def count_reads(monkeypatch, active: list[bool]) -> Counter:
    """Host reads of float and bool tensors while ``active[0]``, by call site."""
    reads: Counter = Counter()
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            if active[0] and (self.is_floating_point() or self.dtype == torch.bool):
                reads[site()] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def count_inside(monkeypatch, methods: tuple[str, ...], active: list[bool]) -> Counter:
    """Calls of the generator step's ``methods``, each counting reads (``active``) while it runs."""
    calls: Counter = Counter()
    for method in methods:
        real = getattr(step_mod.GeneratorStep, method)

        def run(self, *args, _real=real, _method=method, **kwargs):
            calls[_method] += 1
            active[0] = True
            try:
                return _real(self, *args, **kwargs)
            finally:
                active[0] = False

        monkeypatch.setattr(step_mod.GeneratorStep, method, run)
    return calls


def test_the_generator_step_reads_the_device_once_per_optimizer_step(tmp_path, demo_dir, monkeypatch):
    active = [False]
    reads = count_reads(monkeypatch, active)
    calls = count_inside(monkeypatch, ("_micro_step", "_optimizer_step", "_report_step"), active)
    cfg = tiny(tmp_path, demo_dir / "train", SIDE_OFF, max_steps=6)  # accumulation 2: 12 micro-steps
    assert train(cfg, progress=False).global_step == 6
    assert calls["_micro_step"] == 12 and calls["_optimizer_step"] == 6
    assert reads[STEP_READ] == 6  # one per optimizer step (was 2 per step and 4 per micro-step)
    others = {k: v for k, v in reads.items() if k != STEP_READ and k not in HOST_DRAWN | MEASURING}
    assert not others, others
    # The monitor measures step 1's two micro-batches only (then every 1000th step).
    assert sum(reads[k] for k in MEASURING) <= 2 * 8


# The side networks' steps read once per network and step, except where listed: the domain/enhancer loss
# stack's per-term NaN check, and the enhancer's degradation, which runs on the CPU (both still to move).
SIDE_KNOWN = {"losses/stack.py:guarded_sum"}


def test_the_side_networks_steps_read_once_per_network(tmp_path, demo_dir, monkeypatch):
    active = [False]
    reads = count_reads(monkeypatch, active)
    real_side = step_mod.GeneratorStep._side_steps

    def side_steps(self, micro):
        active[0] = True
        try:
            return real_side(self, micro)
        finally:
            active[0] = False

    monkeypatch.setattr(step_mod.GeneratorStep, "_side_steps", side_steps)
    stepped: Counter = Counter()
    real_apply = TrainedNet.apply

    def apply(self, *args, **kwargs):
        if active[0]:
            stepped[self.name] += 1
        return real_apply(self, *args, **kwargs)

    monkeypatch.setattr(TrainedNet, "apply", apply)
    on = {
        "monitor": {"measure_every": 1000},
        "losses": {"domain": True, "adversarial": True},
        "sr": {"train": True},
    }
    on["losses"]["disc_warmup_steps"] = 0
    assert train(tiny(tmp_path, demo_dir / "train", on, max_steps=4), progress=False).global_step == 4
    assert set(stepped) == {"discriminator", "enhancer", "super-resolution"} and min(stepped.values()) >= 4
    assert reads[STEP_READ] == sum(stepped.values()), (reads, stepped)  # one read per network and step
    others = {k: v for k, v in reads.items() if k != STEP_READ and k not in SIDE_KNOWN}
    assert not others, others
