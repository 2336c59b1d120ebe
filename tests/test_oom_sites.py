"""Out of memory where it can happen besides the generator's micro-step (which ``tests/test_resume.py``
covers; the enhancer's, ``tests/test_speed_switches.py``): a CUDA library's allocation failure, the
super-resolution stage's and the discriminator's steps, the optimizer, the EMA, the sample grid, validation
and the folder evaluation, an error no site recovers from, and the GPU's rule of gradient checkpointing
before a micro-batch too small."""

from __future__ import annotations

import logging

import pytest
import torch

from moas.checkpoint import load_checkpoint
from moas.config import load_config
from moas.config_sections import SRConfig
from moas.data.dataset import ArtDataset, to_model_range
from moas.errors import MoasError
from moas.monitor.run_monitor import RunMonitor
from moas.text.bank import TextBank
from moas.text.encoder import HASH_ID, TextEncoder
from moas.train.builders import build_side_networks
from moas.train.faults import checkpointing_first, is_oom
from moas.train.loop import train
from moas.train.sr_stage import SRStageTraining
from moas.train.trained_net import EMA, StateKeys, TrainedNet, adamw, grad_scaler

from .conftest import TINY_CONFIG, tiny

CPU = torch.device("cpu")

CAPTIONS = ["1girl, red hair", "1boy, blue eyes", "1girl, forest", "1boy, city"]


def test_cuda_library_allocation_failures_count_as_out_of_memory():
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"))


def test_on_a_gpu_checkpointing_comes_before_a_micro_batch_below_four():
    assert checkpointing_first(4, 4, 1, "cuda", checkpointing=False)  # 4 → 2 would be launch-bound
    assert not checkpointing_first(8, 2, 1, "cuda", checkpointing=False)  # 8 → 4 is still efficient
    assert not checkpointing_first(4, 4, 1, "cuda", checkpointing=True)  # already on: shrink
    assert not checkpointing_first(4, 4, 1, "cpu", checkpointing=False)  # the CPU is never launch-bound


class Images:
    """High-resolution training images as the run's dataset serves them."""

    resolution = 32

    def __len__(self) -> int:
        return len(CAPTIONS)

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {
            "pixels": torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8),
            "caption": CAPTIONS[i],
        }


def stage() -> SRStageTraining:
    cfg = SRConfig(
        train=True, crop=16, block_channels=[16, 32], attention=[False, True], batch_size=4, scale=2
    )
    bank = TextBank(TextEncoder(require_id=HASH_ID), CAPTIONS, progress=False)
    torch.manual_seed(0)
    return SRStageTraining(cfg, Images(), bank, torch.device("cpu"), seed=0)


def test_the_super_resolution_step_redoes_its_batch_in_chunks_after_out_of_memory(monkeypatch):
    sr = stage()
    batch = sr.batch()
    whole, ok = sr._backward(batch, 1)
    grads = [p.grad.clone() for p in sr.model.parameters()]
    halves, _ = sr._backward(batch, 2)  # the same batch in two chunks, each weighted by its share
    assert bool(ok) and abs(float(whole) - float(halves)) < 1e-5
    for g, p in zip(grads, sr.model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-7)

    real, calls, fired = SRStageTraining.loss, [], []

    def loss(self, batch):
        calls.append(batch["x0"].shape[0])
        if not fired:
            fired.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(self, batch)

    monkeypatch.setattr(SRStageTraining, "loss", loss)
    scalars = sr.step()
    assert calls == [4, 2, 2] and sr.net.chunks == 2 and sr.steps == 1 and scalars["sr/loss"] > 0
    calls.clear()
    sr.step()  # the next steps start with what fitted
    assert calls == [2, 2] and sr.steps == 2


def test_out_of_memory_in_the_sample_grid_or_validation_skips_it_and_training_goes_on(
    tmp_path, demo_dir, monkeypatch, caplog
):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")

    monkeypatch.setattr(RunMonitor, "sample_grid", oom)
    monkeypatch.setattr(RunMonitor, "on_checkpoint", oom)
    cfg = tiny(tmp_path, demo_dir / "train", epochs=2, sample_every=1, save_every=1)
    with caplog.at_level(logging.ERROR, logger="moas.errors"):
        result = train(cfg, progress=False)
    assert result.epochs_done == 2 and (tmp_path / "ckpt" / "epoch_0002.pt").is_file()
    text = caplog.text
    assert text.count("Out of memory in the sample grid") == 2
    assert text.count("Out of memory in validation and the folder evaluation") == 2
    assert "training goes on" in text


# --- the optimizer, the EMA and the discriminator -----------------------------------------------------
def small_net(amp: torch.dtype | None, seed: int = 0) -> TrainedNet:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    opt = adamw(module.parameters(), lr=1e-2, amsgrad=True)
    ema = EMA(module, 0.9)
    keys = StateKeys("model", "optimizer", "scaler", "ema")
    return TrainedNet("generator", module, opt, grad_scaler(CPU, amp), keys, max_grad_norm=1.0, ema=ema)


def one_step(net: TrainedNet, seed: int) -> torch.Tensor | None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
    net.backward(net.module(x).pow(2).mean())
    return net.apply(True)


def weights(net: TrainedNet) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*net.module.parameters(), *net.ema.model.parameters()]]


@pytest.mark.parametrize("amp", [None, torch.float16], ids=["fp32", "fp16-scaler"])
def test_an_oom_while_the_optimizer_makes_its_moments_is_redone(monkeypatch, caplog, amp):
    """The moments are made at the first step, for every parameter before any is updated: an error there
    changed nothing, so the step is redone (per tensor) and lands where the uninterrupted one does."""
    straight, hit = small_net(amp), small_net(amp)
    for seed in (1, 2):
        one_step(straight, seed)
    real, fired = torch.optim.AdamW._init_group, []

    def init_group(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if not fired:  # after the moments of the first group are made, before the update
            fired.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB (injected)")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "_init_group", init_group)
    with caplog.at_level(logging.ERROR, logger="moas.errors"):
        assert one_step(hit, 1) is not None
    one_step(hit, 2)
    assert fired and hit.steps == 2 and "redone with per-tensor updates" in caplog.text
    assert all(g["fused"] is False and g["foreach"] is False for g in hit.opt.param_groups)
    for a, b in zip(weights(straight), weights(hit), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)  # fused and per-tensor agree up to rounding


def test_an_oom_after_the_update_began_is_not_redone(monkeypatch):
    net, real = small_net(None), torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        real(self, *args, **kwargs)  # the weights have moved: a redo would move them twice
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(torch.OutOfMemoryError):
        one_step(net, 1)
    assert net.steps == 0 and all(g["fused"] is not False for g in net.opt.param_groups)


def test_an_oom_in_the_ema_update_is_redone_tensor_by_tensor(monkeypatch, caplog):
    straight, hit = small_net(None), small_net(None)
    one_step(straight, 1)
    real, fired = torch._foreach_lerp_, []

    def lerp(*args, **kwargs):
        if not fired:
            fired.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_lerp_", lerp)
    with caplog.at_level(logging.ERROR, logger="moas.errors"):
        one_step(hit, 1)
    assert fired and "EMA update" in caplog.text and hit.ema.num_updates == 1
    for a, b in zip(weights(straight), weights(hit), strict=True):
        assert torch.equal(a, b)  # the per-tensor lerp gives the list update's bits


def test_the_discriminator_step_redoes_its_batch_in_chunks_after_out_of_memory(
    demo_dir, tmp_path, monkeypatch
):
    overrides = {"losses": {"domain": True, "adversarial": True}, "data": {"cache_dir": str(tmp_path)}}
    cfg = load_config(config_file=TINY_CONFIG, overrides=overrides, use_env=False)
    ds = ArtDataset(demo_dir / "train", cfg.data.resolution, cfg.data.cache_dir)
    side = build_side_networks(cfg, ds, CPU)
    real_images = to_model_range(torch.stack([ds[i]["pixels"] for i in range(4)]))  # (4, 3, 16, 16)
    fake_images = real_images.flip(0) * 0.5
    sizes, disc = [], side.disc.forward

    def forward(x):
        sizes.append(x.shape[0])
        if len(sizes) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")
        return disc(x)

    monkeypatch.setattr(side.disc, "forward", forward)
    logs = side.discriminator_step(real_images, fake_images)
    assert sizes == [4, 2, 2, 2, 2] and side.disc_net.chunks == 2 and side.disc_net.steps == 1
    assert "disc/loss" in logs and all(torch.isfinite(p).all() for p in side.disc.parameters())


@pytest.mark.slow
def test_an_oom_no_site_can_recover_from_ends_with_one_sentence_and_a_checkpoint(
    tmp_path, demo_dir, monkeypatch
):
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.state and max(float(s["step"]) for s in self.state.values()) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(MoasError, match=r"Out of memory where the run cannot recover .*emergency checkpoint"):
        train(tiny(tmp_path, demo_dir / "train", max_steps=4), progress=False)
    e = load_checkpoint(tmp_path / "ckpt" / "emergency_epoch_0001.pt")
    assert e["global_step"] == 1  # the last boundary: step 2 never finished
