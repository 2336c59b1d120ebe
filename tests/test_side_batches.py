"""The side networks' images (``moas.train.side_batches``): the high-resolution dataset built from the run's
validation, the index stream as a function of the step, loading in worker processes, their shutdown, and
the enhancer's degradation on the training device."""

from __future__ import annotations

import os

import psutil
import pytest
import torch
from torch.utils.data import Dataset

from moas.config_sections import EnhanceConfig, LossConfig, SRConfig
from moas.data.dataset import ArtDataset
from moas.train.degrade import degrade
from moas.train.side_batches import SideBatches, hr_dataset, step_indices

STEPS = 6
# Two workers on a machine that may lend one core: torch's advice to use fewer is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


class WithPid(Dataset):
    """``inner``'s items, each with the process that loaded it (a module-level class: spawned workers import
    it to unpickle the dataset)."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        return {**self.inner[i], "i": i, "pid": os.getpid()}


@pytest.fixture(scope="module")
def demo_set(demo_dir, tmp_path_factory) -> ArtDataset:
    ds = ArtDataset(demo_dir / "train", 16, tmp_path_factory.mktemp("side_cache"))
    ds.validate(progress=False)
    return ds


def run_steps(dataset: Dataset, workers: int, steps: list[int]) -> tuple[list[dict], list[int]]:
    """The batches of ``steps`` (batch 4, seed 5) and the loader's worker processes; the loader is closed."""
    batches = SideBatches(dataset, 4, 5, "test", workers, keys=("pixels", "caption", "i", "pid"))
    try:
        out = [batches.batch(s) for s in steps]
        pids = [c.pid for c in psutil.Process().children(recursive=True)]
    finally:
        batches.close()
    return out, pids


@pytest.fixture(scope="module")
def with_workers(demo_set) -> dict:
    """Steps 0…STEPS-1 of the 64-px images through 2 spawned workers (started once for the module), then
    steps 3 and 1: the persistent workers restart from there, dropping what they had loaded ahead."""
    hr = hr_dataset(demo_set, 64, ram_cache_bytes=2**20)
    batches, pids = run_steps(WithPid(hr), 2, [*range(STEPS), 3, 1])
    return {"batches": batches, "pids": pids, "hr": hr}


def test_side_images_are_loaded_in_worker_processes_which_stop_on_close(with_workers):
    loaded = {p for b in with_workers["batches"] for p in b["pid"]}
    assert os.getpid() not in loaded and loaded <= set(with_workers["pids"]) and len(loaded) == 2
    for pid in loaded:  # close() joined them
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    zero, _ = run_steps(WithPid(with_workers["hr"]), 0, [0])
    assert set(zero[0]["pid"]) == {os.getpid()}  # 0 workers: the main process


def test_batches_are_a_function_of_the_step_whatever_the_workers_and_a_resume(with_workers):
    hr = with_workers["hr"]
    straight, _ = run_steps(WithPid(hr), 0, list(range(STEPS)))
    for a, b in zip([*straight, straight[3], straight[1]], with_workers["batches"], strict=True):
        assert a["i"] == b["i"] and torch.equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"]
        assert a["pixels"].shape == (4, 3, 64, 64) and a["pixels"].dtype == torch.uint8
    resumed, _ = run_steps(WithPid(hr), 0, [3, 3, 4, 5, 1])  # a resume at 3, a redone step, a jump back
    assert [b["i"] for b in resumed] == [straight[s]["i"] for s in (3, 3, 4, 5, 1)]
    # Each pass over the images is a permutation, each stream its own.
    n = len(hr)
    first_pass = [i for s in range(n // 4) for i in step_indices(n, 4, 5, "test", s)]
    assert sorted(first_pass) == list(range(n)) and first_pass != list(range(n))
    assert step_indices(n, 4, 5, "other", 0) != step_indices(n, 4, 5, "test", 0)
    assert step_indices(n, 4, 6, "test", 0) != step_indices(n, 4, 5, "test", 0)


def test_the_hr_dataset_reuses_the_validation_hashes_nothing_and_keeps_entries(
    demo_set, tmp_path, monkeypatch
):
    import moas.data.dataset as dataset_mod

    class NoHashing:
        @staticmethod
        def sha256(*args):
            raise AssertionError("a file was hashed again")

    monkeypatch.setattr(dataset_mod, "hashlib", NoHashing)
    picked = [5, 0, 7]
    hr = hr_dataset(demo_set, 48, ram_cache_bytes=2**20, indices=picked)  # a size no other test builds
    assert len(hr) == 3 and hr.paths == [demo_set.paths[i] for i in picked]
    assert [hr[k]["caption"] for k in range(3)] == [demo_set.captions()[i] for i in picked]
    assert hr.rebuilt == 3 and len(hr._ram) == 3  # built once, then kept in RAM
    again = hr_dataset(demo_set, 48, indices=picked)
    items = [again[k] for k in range(3)]
    assert again.rebuilt == 0  # read back from its own cache entries
    monkeypatch.undo()
    lazy = ArtDataset(demo_set.root, 48, None)  # the images decoded and cropped the old, lazy way
    lazy.paths = list(hr.paths)
    for k, item in enumerate(items):
        assert torch.equal(item["pixels"], lazy[k]["pixels"])
    unchecked = hr_dataset(ArtDataset(demo_set.root, 16, None), 48)  # not validated: the lazy view
    assert unchecked._entries is None and torch.equal(unchecked[picked[0]]["pixels"], items[0]["pixels"])


def test_a_resumed_sr_stage_draws_the_same_crops(demo_set, text_encoder):
    from moas.text.bank import TextBank
    from moas.train.sr_stage import SRStageTraining

    cfg = SRConfig(train=True, crop=32, block_channels=[16, 32], attention=[False, True], batch_size=4)
    bank = TextBank(text_encoder, demo_set.captions(), progress=False)
    hr = hr_dataset(demo_set, 64)

    def stage() -> SRStageTraining:
        return SRStageTraining(cfg, hr, bank, torch.device("cpu"), seed=3)

    straight, saved = stage(), None
    batches = []
    for s in range(3):
        if s == 2:
            saved = straight.net.state_dict()
        batches.append(straight.batch())
        straight.net.steps += 1  # as a step that was taken
    resumed = stage()
    resumed.net.load_state_dict(saved)
    again = resumed.batch()
    assert again.keys() == batches[2].keys()
    assert all(torch.equal(again[k], batches[2][k]) for k in again)
    assert not torch.equal(batches[0]["x0"], batches[1]["x0"])


def test_the_enhancer_resumes_on_the_same_images_and_pairs(demo_set):
    from moas.train.side_networks import SideNetworks

    def side() -> SideNetworks:
        ec = EnhanceConfig(width=4, sr_channels=4, sr_blocks=1, batch_size=4)
        kw = {"generator_lr": 1e-3, "weight_decay": 0.0, "term_clamp": 10.0, "max_grad_norm": 1.0}
        return SideNetworks(LossConfig(domain=False), ec, demo_set, torch.device("cpu"), seed=2, **kw)

    straight = side()
    for _ in range(2):
        straight.enhancer_step()
    assert straight.enh_net.steps == 2
    state = straight.state_dict()
    expected = straight._hr_batch()
    n = len(straight.hr)
    want = torch.stack([straight.hr[i]["pixels"] for i in step_indices(n, 4, 2, "enhancer", 2)])
    assert torch.equal(expected, want.float() / 127.5 - 1)
    resumed = side()
    resumed.load_state_dict(state)
    assert torch.equal(resumed._hr_batch(), expected)
    g1, g2 = straight.enh_net.gen, resumed.enh_net.gen
    assert torch.equal(degrade(expected, 2, g1), degrade(expected, 2, g2))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_degrade_on_the_device_gives_the_cpu_pairs(device):
    """The enhancer degrades its batch where it lies; the draws stay on the CPU generator, so the pairs are
    the ones the CPU formula (the batch brought to the CPU, degraded, sent back) gives."""
    hr = torch.rand(3, 3, 32, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, 3, H, W)
    g_cpu, g_here = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    on_cpu = degrade(hr.cpu(), 4, g_cpu).to(device)
    here = degrade(hr.to(device), 4, g_here)
    assert here.device.type == device and here.shape == (3, 3, 8, 6)
    assert torch.equal(g_cpu.get_state(), g_here.get_state())  # the same draws, from the same generator
    if device == "cpu":
        assert torch.equal(here, on_cpu)
    else:  # other kernels: the same pairs up to float rounding
        assert torch.allclose(here, on_cpu, atol=1e-5, rtol=0)


def test_the_run_closes_the_side_loaders_also_when_it_fails(tmp_path, demo_dir, monkeypatch):
    from moas.train.loop import train
    from moas.train.parts import TrainingParts
    from moas.train.side_networks import SideNetworks

    from .conftest import tiny

    closed = []
    real_close = TrainingParts.close_loaders
    monkeypatch.setattr(TrainingParts, "close_loaders", lambda self: closed.append(1) or real_close(self))

    def broken(self):
        raise RuntimeError("injected failure in the enhancer step")

    monkeypatch.setattr(SideNetworks, "enhancer_step", broken)
    with pytest.raises(RuntimeError, match="injected"):
        train(tiny(tmp_path, demo_dir / "train", max_steps=1), progress=False)
    assert closed == [1]
