"""Mixed precision on the CPU: autocast and the three GradScalers (generator, discriminator, enhancer).

CPU autocast runs bf16 and fp16, and ``GradScaler("cpu")`` the whole scale → backward → unscale_ → step →
update cycle, so the GPU's mixed-precision path is tested here without a GPU: every optimizer steps through
its own enabled scaler, the scalers' states are checkpointed (and resume bit-identically: the reference run
of tests/test_resume.py is fp16, its scalers compared at every resume), an overflow halves
the scale and skips the step without touching the weights, and a bf16 step's loss is close to fp32's.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moas.checkpoint import load_checkpoint
from moas.config import load_config
from moas.data.dataset import ArtDataset
from moas.device import autocast_dtype, inference_dtype
from moas.train import trained_net as trained_net_mod
from moas.train.builders import build_side_networks
from moas.train.loop import Trainer, train
from moas.train.rotation import find_latest_checkpoint
from moas.train.trained_net import grad_scaler, load_scaler_state

from .conftest import TINY_CONFIG, tiny

CPU = torch.device("cpu")
SIDE = {"losses": {"adversarial": True, "disc_warmup_steps": 1}}  # the enhancer trains by default


def amp_config(root: Path, data: Path, mode: str = "fp16", **train_kw):
    return tiny(root, data, SIDE, mixed_precision=mode, **train_kw)


def all_weights(path: Path, nets: tuple[str, ...] = ("disc", "enhancer")) -> dict[str, torch.Tensor]:
    """Generator and EMA weights of a checkpoint, and those of the side networks ``nets``."""
    state = load_checkpoint(path)
    out = {f"m.{k}": v for k, v in state["model"].items()}
    out |= {f"e.{k}": v for k, v in state["ema"]["model"].items()}
    for net in nets:
        out |= {f"{net}.{k}": v for k, v in state["domain"][net].items()}
    return out


def scaler_states(path: Path) -> dict[str, dict]:
    state = load_checkpoint(path)
    return {
        "generator": state["scaler"],
        "disc": state["domain"]["disc_scaler"],
        "enhancer": state["domain"]["enh_scaler"],
    }


# --------------------------------------------------------------------------------------------- units


def test_auto_stays_fp32_on_the_cpu_and_an_explicit_mode_is_honoured():
    assert autocast_dtype(CPU, "auto") is None and autocast_dtype(CPU, "no") is None
    assert autocast_dtype(CPU, "fp16") == torch.float16 and autocast_dtype(CPU, "bf16") == torch.bfloat16


def test_auto_on_cuda_takes_bf16_only_where_the_card_has_it_natively(monkeypatch):
    """Turing and Volta report bf16 as supported through emulation: there fp16 with a scaler is faster."""
    cuda = torch.device("cuda")
    for native, want in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(
            torch.cuda,
            "is_bf16_supported",
            lambda including_emulation=True, n=native: n or including_emulation,
        )
        assert autocast_dtype(cuda, "auto") == want and autocast_dtype(cuda, "native") == want
        assert autocast_dtype(cuda, "bf16") == torch.bfloat16 and autocast_dtype(cuda, "no") is None


def test_native_is_bf16_only_on_a_cpu_with_bf16_instructions(monkeypatch, tmp_path):
    import builtins

    from moas import device

    real_open = builtins.open
    for flags, want in (("fpu sse avx512f avx512_bf16", torch.bfloat16), ("fpu sse avx2", None)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor : 0\nflags\t\t: {flags}\n")

        def fake(path, *a, _info=info, **k):
            return real_open(_info if path == "/proc/cpuinfo" else path, *a, **k)

        monkeypatch.setattr(builtins, "open", fake)
        assert device.cpu_has_native_bf16() == (want is not None)
        assert autocast_dtype(CPU, "native") == want
    monkeypatch.setattr(builtins, "open", real_open)
    assert load_config(None, TINY_CONFIG, overrides={"train": {"mixed_precision": "native"}}, use_env=False)


def test_the_scaler_follows_the_device_and_only_fp16_enables_it():
    s = grad_scaler(CPU, torch.float16)
    assert s.is_enabled() and s._device == "cpu"
    assert not grad_scaler(CPU, torch.bfloat16).is_enabled() and not grad_scaler(CPU, None).is_enabled()
    # A checkpoint of an fp32 run (empty state) or of an older release (none) leaves a fresh scaler.
    for old in ({}, None):
        fresh = grad_scaler(CPU, torch.float16)
        load_scaler_state(fresh, old)
        assert fresh.get_scale() == 2.0**16
    s.scale(torch.ones(()))  # the scale tensor is made at the first scale()
    s.update(new_scale=128.0)
    restored = grad_scaler(CPU, torch.float16)
    load_scaler_state(restored, s.state_dict())
    assert restored.get_scale() == 128.0


@pytest.fixture(scope="module")
def fp16_domain(demo_dir, tmp_path_factory):
    cfg = load_config(
        config_file=TINY_CONFIG,
        overrides={**SIDE, "data": {"cache_dir": str(tmp_path_factory.mktemp("cache"))}},
        use_env=False,
    )
    ds = ArtDataset(demo_dir / "train", cfg.data.resolution, cfg.data.cache_dir)
    ds.validate(progress=False)
    return cfg, ds


@pytest.mark.parametrize("net", ["disc", "enhancer"])
def test_a_side_network_overflow_halves_its_scale_and_skips_its_step(fp16_domain, monkeypatch, net):
    """An inf gradient (an fp16 overflow) in one side network: its scale halves, its weights and optimizer
    state stay as they were; the other network steps normally; the next step trains again."""
    cfg, ds = fp16_domain
    dom = build_side_networks(cfg, ds, CPU, torch.float16)
    mine, theirs = (dom.disc_net, dom.enh_net) if net == "disc" else (dom.enh_net, dom.disc_net)
    module, scaler = mine.module, mine.scaler
    other, other_scaler = theirs.module, theirs.scaler
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1  # (4, 3, 16, 16)
    dom.after_step(x0, x0.flip(0), global_step=1)  # one clean step: optimizer states exist
    before = {k: v.clone() for k, v in module.state_dict().items()}
    other_before = {k: v.clone() for k, v in other.state_dict().items()}
    scale, other_scale = scaler.get_scale(), other_scaler.get_scale()
    real_average = trained_net_mod.average_gradients

    def overflow(params):  # runs between backward and unscale_, as the DDP averaging does
        params = list(params)
        if any(p is q for p in params for q in module.parameters()):
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = float("inf")
        real_average(params)

    monkeypatch.setattr(trained_net_mod, "average_gradients", overflow)
    dom.after_step(x0, x0.flip(0), global_step=2)
    assert scaler.get_scale() == scale / 2 and other_scaler.get_scale() == other_scale
    after = module.state_dict()
    # BatchNorm statistics move with the forward pass; every learned weight stays.
    learned = {k for k, _ in module.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in learned)
    assert any(not torch.equal(other_before[k], v) for k, v in other.state_dict().items())
    monkeypatch.setattr(trained_net_mod, "average_gradients", real_average)
    dom.after_step(x0, x0.flip(0), global_step=3)
    assert scaler.get_scale() == scale / 2
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items() if k in learned)


# ------------------------------------------------------------------------------------- training runs


@pytest.mark.slow
def test_fp16_training_steps_every_optimizer_through_its_scaler(tmp_path, demo_dir, monkeypatch):
    """4 optimizer steps in fp16 on the CPU: scale → backward → unscale_ → step → update for the generator,
    the discriminator and the enhancer, each with its own enabled scaler; the states are checkpointed."""
    calls: list[tuple[str, int, int]] = []
    cls = torch.amp.GradScaler
    for name in ("scale", "unscale_", "step", "update"):
        real = getattr(cls, name)

        def spy(self, *a, _name=name, _real=real, **kw):
            if self.is_enabled():
                calls.append((_name, id(self), id(a[0]) if _name in ("unscale_", "step") else 0))
            return _real(self, *a, **kw)

        monkeypatch.setattr(cls, name, spy)
    seen: dict[str, object] = {}
    real_init = Trainer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        seen["parts"] = self.parts

    monkeypatch.setattr(Trainer, "__init__", init)
    r = train(amp_config(tmp_path, demo_dir / "train", max_steps=4), progress=False)
    assert r.global_step == 4 and r.skipped_steps == 0 and math.isfinite(r.final_loss)
    p = seen["parts"]
    d = p.side
    pairs = [(p.scaler, p.opt), (d.disc_net.scaler, d.disc_net.opt), (d.enh_net.scaler, d.enh_net.opt)]
    assert len({id(s) for s, _ in pairs}) == 3
    for scaler, opt in pairs:
        mine = [(n, o) for n, s, o in calls if s == id(scaler)]
        assert [n for n, _ in mine if n != "scale"] == ["unscale_", "step", "update"] * 4
        assert {o for n, o in mine if n in ("unscale_", "step")} == {id(opt)}
        assert sum(n == "scale" for n, _ in mine) >= 4  # one per backward (the generator: per micro-batch)
    states = scaler_states(find_latest_checkpoint(tmp_path / "ckpt"))
    for s in states.values():  # four good steps: the growth tracker counts them, the scale is untouched
        assert s["scale"] == 2.0**16 and s["_growth_tracker"] == 4
    assert all(
        torch.isfinite(v).all() for v in all_weights(find_latest_checkpoint(tmp_path / "ckpt")).values()
    )


@pytest.mark.slow
def test_an_overflow_halves_the_scale_and_skips_the_step(tmp_path, demo_dir, monkeypatch):
    """An inf gradient in the generator (``inf_grad@3``: the first micro-batch of step 2): the scale halves,
    the step is skipped (no update of weights, EMA or optimizer state), and training goes on."""
    records = []
    real = Trainer._optimizer_step

    def step(self, *a, **kw):
        p = self.parts
        before = {k: v.clone() for k, v in p.model.state_dict().items()}
        ema = {k: v.clone() for k, v in p.ema.model.state_dict().items()}
        scale, skipped, n = p.scaler.get_scale(), self.state.skipped_steps, self.state.global_step
        real(self, *a, **kw)
        records.append(
            {
                "skipped": self.state.skipped_steps - skipped,
                "scale": (scale, p.scaler.get_scale()),
                "steps": (n, self.state.global_step),
                "same": all(torch.equal(before[k], v) for k, v in p.model.state_dict().items()),
                "ema_same": all(torch.equal(ema[k], v) for k, v in p.ema.model.state_dict().items()),
                "grads": [q.grad for q in p.model.parameters() if q.grad is not None],
            }
        )

    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    monkeypatch.setenv("MOAS_INJECT", "inf_grad@3")
    r = train(amp_config(tmp_path, demo_dir / "train", max_steps=3), progress=False)
    assert r.global_step == 3 and r.skipped_steps == 1
    bad = records[1]
    assert bad["skipped"] == 1 and bad["scale"] == (2.0**16, 2.0**15) and bad["steps"] == (1, 1)
    assert bad["same"] and bad["ema_same"] and bad["grads"] == []
    good = [rec for k, rec in enumerate(records) if k != 1]
    assert all(rec["skipped"] == 0 and not rec["same"] for rec in good)
    assert all(rec["scale"][1] == 2.0**15 for rec in good[1:])  # no further overflow
    final = load_checkpoint(find_latest_checkpoint(tmp_path / "ckpt"))
    assert final["skipped_steps"] == 1 and final["scaler"]["scale"] == 2.0**15
    assert all(torch.isfinite(v).all() for v in final["model"].values())


@pytest.mark.slow
def test_a_bf16_step_loses_about_what_an_fp32_step_loses(tmp_path, demo_dir):
    """The first step's loss (before any update) under CPU bf16 autocast is within 1 % of fp32's."""
    data = demo_dir / "train"
    losses = {}
    for mode in ("no", "bf16"):
        cfg = amp_config(tmp_path / mode, data, mode, max_steps=1, grad_accum_steps=1)
        r = train(cfg, progress=False)
        assert r.global_step == 1
        losses[mode] = r.final_loss
    assert losses["bf16"] != losses["no"]  # autocast was on
    assert losses["bf16"] == pytest.approx(losses["no"], rel=1e-2)


def test_generation_runs_in_bf16_only_on_a_gpu_with_native_bf16(monkeypatch):
    from moas.errors import ConfigError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert inference_dtype(cpu) is None  # the CPU generates in float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        assert inference_dtype(cuda) == torch.bfloat16
        assert matmul.allow_tf32  # float32 products on TF32 cores
    finally:
        matmul.allow_tf32 = before
    assert inference_dtype(cuda, "fp32") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert inference_dtype(cuda) is None  # Turing/Volta emulate bf16: float32 there
    with pytest.raises(ConfigError):
        inference_dtype(cuda, "fp16")
