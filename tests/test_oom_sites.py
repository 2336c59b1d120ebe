"""Out of memory where it can happen besides the generator's micro-step (which ``tests/test_resume.py``
covers): a CUDA library's allocation failure, the super-resolution stage's step, the sample grid, validation
and the folder evaluation, and the GPU's rule of gradient checkpointing before a micro-batch too small."""

from __future__ import annotations

import logging

import torch

from moas.config_sections import SRConfig
from moas.monitor.run_monitor import RunMonitor
from moas.text.bank import TextBank
from moas.text.encoder import HASH_ID, TextEncoder
from moas.train.faults import checkpointing_first, is_oom
from moas.train.loop import train
from moas.train.sr_stage import SRStageTraining

from .conftest import tiny

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
    whole = sr._backward(batch, 1)
    grads = [p.grad.clone() for p in sr.model.parameters()]
    halves = sr._backward(batch, 2)  # the same batch in two chunks, each weighted by its share
    assert abs(whole - halves) < 1e-5
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
