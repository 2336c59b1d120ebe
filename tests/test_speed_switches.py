"""The GPU-path speed switches and out-of-memory recovery, each proven on the CPU.

* gradient checkpointing and channels_last compute what the default U-Net computes (to float rounding);
* the EMA's one-call ``torch._foreach_lerp_`` gives the same bits as the per-tensor loop it replaces;
* ``torch.compile`` failing, at once, at the first call or in a later backward, leaves one warning and an
  uncompiled U-Net (a failed step is redone from its start);
* an out-of-memory error in the enhancer's step is recovered by redoing it in chunks, after the failed
  pass's activations are gone; one that cannot be recovered ends the run with a checkpoint that resumes.
"""

from __future__ import annotations

import copy
import gc
import logging
import weakref

import pytest
import torch

from moas.checkpoint import load_checkpoint, verify_checkpoint
from moas.config import TrainConfig, load_config
from moas.diffusion.objective import DiffusionObjective
from moas.errors import ConfigError, MoasError
from moas.models.unet import DiffusionModel
from moas.train import faults as faults_mod
from moas.train import loop as loop_mod
from moas.train.builders import build_generator
from moas.train.faults import retry_in_chunks
from moas.train.loop import train
from moas.train.rotation import find_latest_checkpoint
from moas.train.side_networks import SideNetworks
from moas.train.speed import compile_forward, resolve_switch, speed_up_unet
from moas.train.trained_net import EMA

from .conftest import TINY_CONFIG, tiny
from .test_golden import tensorboard_scalars

CPU = torch.device("cpu")


def tiny_unet() -> DiffusionModel:
    torch.manual_seed(0)
    return DiffusionModel(16, [32, 32], [False, True], attention_head_dim=16)


def unet_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)  # (B, 3, H, W)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 5, 768, generator=g)  # (B, T, 768)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])  # (B, T)
    pooled = torch.randn(2, 768, generator=g)  # (B, 768)
    return x, t, context, mask, pooled


def loss_and_grads(model: DiffusionModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(*unet_inputs())  # (B, 3, H, W)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    loss = (out * w).sum()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    """``atol`` is relative to the largest gradient: some gradients are float noise around 0 (biases
    whose effect a GroupNorm removes), which no relative tolerance can compare."""
    assert a.keys() == b.keys() and a
    scale = max(float(v.abs().max()) for v in a.values())
    bad = [k for k in a if not torch.allclose(a[k], b[k], rtol=rtol, atol=atol * scale)]
    assert not bad, f"{len(bad)} gradients differ, e.g. {bad[:3]}"


# ----------------------------------------------------------------------------------------- switches


def test_the_switches_default_to_off_on_the_cpu_and_check_their_values():
    tc = TrainConfig()
    assert (tc.gradient_checkpointing, tc.channels_last, tc.compile) == ("auto", "auto", False)
    assert not resolve_switch("auto", False) and resolve_switch("auto", True)
    assert resolve_switch(True, False) and not resolve_switch(False, True)
    assert TrainConfig(channels_last="true").channels_last is True  # as MOAS_TRAIN_CHANNELS_LAST gives it
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        TrainConfig(gradient_checkpointing="sometimes")


def test_gradient_checkpointing_gives_the_same_gradients():
    ref = tiny_unet()
    ckpt = copy.deepcopy(ref)
    ckpt.use_gradient_checkpointing()
    assert ckpt.unet.is_gradient_checkpointing and not ref.unet.is_gradient_checkpointing
    calls = []
    ckpt.unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *a: calls.append(1))
    out_a, grads_a = loss_and_grads(ref)
    out_b, grads_b = loss_and_grads(ckpt)
    assert len(calls) == 2  # the block ran again in the backward pass: checkpointing is on
    assert torch.equal(out_a, out_b)
    assert_close(grads_a, grads_b, rtol=1e-6, atol=1e-9)  # on this CPU they are bit-identical


def test_channels_last_matches_the_default_memory_format():
    ref = tiny_unet()
    nhwc = copy.deepcopy(ref)
    nhwc.use_channels_last()
    w = nhwc.unet.conv_in.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    out_a, grads_a = loss_and_grads(ref)
    out_b, grads_b = loss_and_grads(nhwc)
    assert torch.allclose(out_a, out_b, rtol=1e-5, atol=1e-6)
    assert_close(grads_a, grads_b, rtol=1e-4, atol=1e-5)  # another convolution algorithm: rounding


@pytest.fixture(scope="module")
def generator():
    cfg = load_config(None, TINY_CONFIG, use_env=False)
    torch.manual_seed(0)
    return build_generator(cfg, CPU)


def test_speed_up_unet_applies_the_switches_to_the_model_and_its_ema_copy(generator):
    model = copy.deepcopy(generator)
    ema = copy.deepcopy(generator)
    speed_up_unet(model, ema, CPU, "auto", "auto", False)  # the CPU defaults: nothing changes
    assert not model.unet.channels_last and not model.unet.unet.is_gradient_checkpointing
    speed_up_unet(model, ema, torch.device("cuda"), "auto", "auto", False, planned_checkpointing=True)
    assert not model.unet.channels_last and not ema.unet.channels_last  # auto: off until measured on a GPU
    speed_up_unet(model, ema, torch.device("cuda"), True, "auto", False)
    assert model.unet.channels_last and ema.unet.channels_last
    assert model.unet.unet.is_gradient_checkpointing and not ema.unet.unet.is_gradient_checkpointing


def test_foreach_ema_equals_the_per_tensor_loop_bit_for_bit(generator):
    """The update the EMA used to run, tensor by tensor, against the one-call foreach update."""
    model = copy.deepcopy(generator)
    ema = EMA(model, decay=0.995)
    loop = copy.deepcopy(ema.model)
    n_tensors = len(list(model.parameters()))
    assert n_tensors > 200
    g = torch.Generator().manual_seed(3)
    for k in range(1, 13):  # through the warm-up ((1 + n) / (10 + n) < 0.5) and past it
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        ema.update(model)
        d = min(0.995, (1 + k) / (10 + k))
        with torch.no_grad():
            for e, p in zip(loop.parameters(), model.parameters(), strict=True):
                e.lerp_(p.detach(), 1.0 - d)
            for e, b in zip(loop.buffers(), model.buffers(), strict=True):
                e.copy_(b)
    a, b = ema.model.state_dict(), loop.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "foreach EMA differs from the loop"


def test_fused_adamw_is_used_where_torch_has_it(generator):
    from moas.train.trained_net import adamw

    opt = adamw(generator.parameters(), lr=1e-3)
    assert opt.param_groups[0]["fused"] is True  # CPU fused AdamW since torch 2.4


# ------------------------------------------------------------------------------------------ compile


def test_compile_that_raises_at_once_leaves_one_warning_and_the_eager_unet(generator, monkeypatch, caplog):
    def broken(*a, **kw):
        raise RuntimeError("no compiler on this machine\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    model = copy.deepcopy(generator)
    eager = model.unet.unet.forward
    with caplog.at_level(logging.WARNING, logger="moas.train.loop"):
        speed_up_unet(model, copy.deepcopy(generator), CPU, False, False, True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no compiler on this machine" in warnings[0].getMessage()
    assert "more detail" not in warnings[0].getMessage()
    assert model.unet.unet.forward == eager


def test_compile_that_fails_at_the_first_call_falls_back_for_good(monkeypatch, caplog):
    ref, model = tiny_unet(), tiny_unet()
    calls = []

    def lazy(fn, **kw):
        def compiled(*a, **k):
            calls.append(1)
            raise RuntimeError("backend compiler failed")

        return compiled

    monkeypatch.setattr(torch, "compile", lazy)
    assert compile_forward(model.unet)
    with caplog.at_level(logging.WARNING, logger="moas.train.loop"):
        with torch.no_grad():
            first, second, expected = model(*unet_inputs()), model(*unet_inputs()), ref(*unet_inputs())
    assert len(calls) == 1 and len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_an_out_of_memory_error_in_the_compiled_unet_is_not_taken_for_a_compile_failure(monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: oom)
    model = tiny_unet()
    assert compile_forward(model.unet)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        model(*unet_inputs())


def failing_in_backward(path: str = "/site-packages/torch/_inductor/output_code.py"):
    """A stand-in for a compiled forward whose generated backward kernel fails at its second use, as
    inductor's did on this CPU (a stride assertion): the raising frame lives at ``path``."""
    ns: dict = {}
    exec(
        compile(
            "def kernel(g):\n    raise AssertionError('expected size 4==6, stride mismatch')\n", path, "exec"
        ),
        ns,
    )

    class Boom(torch.autograd.Function):
        uses = 0

        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            Boom.uses += 1
            return ns["kernel"](g) if Boom.uses == 2 else g

    def compiler(fn, **kw):
        def compiled(*a, **k):
            out = fn(*a, **k)
            return type(out)(sample=Boom.apply(out.sample))

        return compiled

    return compiler


def test_compile_that_fails_in_a_later_backward_redoes_that_step_uncompiled(
    tmp_path, demo_dir, monkeypatch, caplog
):
    """Step 2's backward raises from the compiler's code: the step is redone from its start with the eager
    U-Net, so the run ends with exactly the weights and losses of a run that never compiled."""
    eager = train(
        tiny(tmp_path / "eager", demo_dir / "train", max_steps=3, grad_accum_steps=1), progress=False
    )
    monkeypatch.setattr(torch, "compile", failing_in_backward())
    cfg = tiny(tmp_path / "compiled", demo_dir / "train", max_steps=3, grad_accum_steps=1, compile=True)
    with caplog.at_level(logging.WARNING, logger="moas.train.loop"):
        compiled = train(cfg, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "stride mismatch" in warnings[0]
    assert compiled.global_step == eager.global_step == 3 and compiled.skipped_steps == 0
    a = load_checkpoint(find_latest_checkpoint(tmp_path / "eager" / "ckpt"))
    b = load_checkpoint(find_latest_checkpoint(tmp_path / "compiled" / "ckpt"))
    differ = {k for k, v in a["model"].items() if not torch.equal(v, b["model"][k])}
    assert not differ, differ  # (with the brain, its MoE usage counters would count the failed pass too)
    assert [v for _, v in tensorboard_scalars(compiled.run_dir, "loss/total")] == [
        v for _, v in tensorboard_scalars(eager.run_dir, "loss/total")
    ]


def test_only_errors_from_the_compiler_are_taken_for_compile_failures():
    ours = failing_in_backward("/home/me/moas/losses/terms.py")
    for compiler, expected in ((failing_in_backward(), True), (ours, False)):
        model = tiny_unet()
        compiled = compile_forward(model.unet, compiler)
        loss = model(*unet_inputs()).sum()
        loss.backward()  # the first backward works
        with pytest.raises(AssertionError) as err:
            model(*unet_inputs()).sum().backward()
        assert compiled.caused(err.value) is expected
    assert not compiled.caused(torch.OutOfMemoryError("CUDA out of memory."))
    compiled.fall_back(RuntimeError("x"))
    assert not compiled.active and not compiled.caused(err.value)


# -------------------------------------------------------------------------------- out of memory


def test_retry_in_chunks_doubles_the_chunks_until_the_step_fits(monkeypatch):
    monkeypatch.setattr(faults_mod, "free_memory", lambda device: None)
    seen = []

    def step(chunks):
        seen.append(chunks)
        if chunks < 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return "done"

    assert retry_in_chunks(step, 1, 6, CPU, "test") == ("done", 4) and seen == [1, 2, 4]
    with pytest.raises(torch.OutOfMemoryError):
        retry_in_chunks(step, 1, 3, CPU, "test")  # 1 → 2 → 3 (the most) still fails
    with pytest.raises(ValueError):
        retry_in_chunks(lambda k: (_ for _ in ()).throw(ValueError("a bug")), 1, 8, CPU, "test")


def activations_alive_at_cleanup(monkeypatch, module) -> dict:
    """Patch ``module.free_memory`` to record whether the failed pass's tensor is still alive once
    collected; the failing pass registers it in ``probe["ref"]``."""
    probe: dict = {"alive": []}
    real = module.free_memory

    def free(device):
        gc.collect()
        probe["alive"].append(probe["ref"]() is not None)
        real(device)

    monkeypatch.setattr(module, "free_memory", free)
    return probe


def failing_pass(probe: dict) -> None:
    activations = torch.ones(64, 1024)  # what a forward pass holds when it runs out of memory
    probe["ref"] = weakref.ref(activations)
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


@pytest.mark.slow
def test_an_oom_in_the_enhancer_step_is_recovered_in_chunks(tmp_path, demo_dir, monkeypatch, caplog):
    """Step 2's enhancer pass runs out of memory on its whole batch: the step is redone on the same pairs
    in two chunks after the failed pass's activations are freed; the chunk count is kept and saved."""
    probe = activations_alive_at_cleanup(monkeypatch, faults_mod)
    calls = []
    real = SideNetworks.enhancer_loss

    def enhancer_loss(self, hr, lr, factor):
        calls.append(hr.shape[0])
        if self.enh_net.steps == 1 and hr.shape[0] == 4:  # step 2, the whole batch
            failing_pass(probe)
        return real(self, hr, lr, factor)

    monkeypatch.setattr(SideNetworks, "enhancer_loss", enhancer_loss)
    with caplog.at_level(logging.ERROR, logger="moas.errors"):
        r = train(tiny(tmp_path, demo_dir / "train", max_steps=4), progress=False)
    assert r.global_step == 4 and r.micro_batch == 4  # the generator's batch is untouched
    assert calls == [4, 4, 2, 2, 2, 2, 2, 2]  # step 1 whole; step 2's failed pass; then halves
    assert probe["alive"] == [False]
    assert any("Out of memory in the enhancer step" in r.getMessage() for r in caplog.records)
    final = load_checkpoint(find_latest_checkpoint(tmp_path / "ckpt"))
    assert final["domain"]["enh_steps"] == 4 and final["domain"]["enh_chunks"] == 2
    assert all(torch.isfinite(v).all() for v in final["domain"]["enhancer"].values())
    assert len(tensorboard_scalars(r.run_dir, "enhance/loss")) == 4


@pytest.mark.slow
def test_an_enhancer_oom_even_one_image_at_a_time_ends_with_a_checkpoint_that_resumes(
    tmp_path, demo_dir, monkeypatch
):
    """The emergency checkpoint is taken after the generator's step 2 (which was applied), so resuming it
    continues with step 3."""
    real = SideNetworks.enhancer_loss

    def enhancer_loss(self, hr, lr, factor):
        if self.enh_net.steps == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(self, hr, lr, factor)

    with monkeypatch.context() as mp:
        mp.setattr(SideNetworks, "enhancer_loss", enhancer_loss)
        with pytest.raises(MoasError, match="even one image at a time"):
            train(tiny(tmp_path, demo_dir / "train", max_steps=4), progress=False)
    emergency = tmp_path / "ckpt" / "emergency_oom_epoch_0001.pt"
    assert verify_checkpoint(emergency)
    e = load_checkpoint(emergency)
    assert (e["global_step"], e["epoch"], e["batch_in_epoch"]) == (2, 0, 4)
    assert e["ema"]["num_updates"] == 2 and e["domain"]["enh_steps"] == 1
    r = train(tiny(tmp_path, demo_dir / "train", max_steps=4, auto_resume=True), progress=False)
    assert r.global_step == 4


@pytest.mark.slow
def test_the_generator_oom_recovery_frees_the_failed_pass_before_cleanup(tmp_path, demo_dir, monkeypatch):
    """The error's traceback holds the forward pass's frames; recovery keeps only its message."""
    probe = activations_alive_at_cleanup(monkeypatch, loop_mod)
    count = {"n": 0}
    real = DiffusionObjective.__call__

    def objective(self, *a, **kw):
        count["n"] += 1
        if count["n"] == 3:  # the first micro-batch of step 2
            failing_pass(probe)
        return real(self, *a, **kw)

    monkeypatch.setattr(DiffusionObjective, "__call__", objective)
    r = train(tiny(tmp_path, demo_dir / "train", max_steps=2), progress=False)
    assert r.global_step == 2 and (r.micro_batch, r.grad_accum) == (2, 4)
    assert probe["alive"] == [False]


@pytest.mark.slow
def test_a_run_with_every_switch_on_follows_the_default_run(tmp_path, demo_dir):
    """Checkpointing and channels_last through the config: the same per-step losses as the default run."""
    data = demo_dir / "train"
    ref = train(tiny(tmp_path / "ref", data, max_steps=3), progress=False)
    on = tiny(tmp_path / "on", data, max_steps=3, gradient_checkpointing=True, channels_last=True)
    fast = train(on, progress=False)
    a = [v for _, v in tensorboard_scalars(ref.run_dir, "loss/total")]
    b = [v for _, v in tensorboard_scalars(fast.run_dir, "loss/total")]
    assert len(a) == len(b) == 3 and a == pytest.approx(b, rel=1e-4)
