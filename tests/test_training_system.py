"""Unit tests: batch plans, OOM batch arithmetic, AdaptiveTrainingSystem, resource manager, L3 cache, HPO."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from moas.data.sampler import BucketBatchSampler
from moas.resources import EnhancedResourceManager, L3CacheManager
from moas.train.adaptive import AdaptiveTrainingSystem
from moas.train.batches import ResumableBatchSampler, RunBatchSampler, steps_per_epoch
from moas.train.distributed import context_from_env
from moas.train.faults import FaultInjector, GracefulStop, is_oom, shrink_micro_batch
from moas.train.hpo import BATCH_CHOICES, CONTINUOUS, AutomaticHyperparameterOptimizer, Trial
from moas.train.saving import milestone_epochs


def test_batch_plan_is_a_pure_function_of_seed_and_epoch():
    """The plan production trains on (aspect buckets × sample weights, one unit per optimizer step)."""
    buckets = [0] * 15 + [1] * 8  # two aspect buckets
    weights = [1.0] * 20 + [2.0, 0.5, 0.0]
    plan = BucketBatchSampler(buckets, weights, 4, seed=7)
    a, b = plan.epoch_batches(3), BucketBatchSampler(buckets, weights, 4, seed=7).epoch_batches(3)
    assert (
        a == b
        and a != plan.epoch_batches(4)
        and a != BucketBatchSampler(buckets, weights, 4, 8).epoch_batches(3)
    )
    assert all(len(x) == 4 for x in a)  # the last batch of each bucket is filled, none dropped
    assert all(len({buckets[i] for i in x}) == 1 for x in a)  # one image size per batch
    assert 22 not in {i for x in a for i in x}  # weight 0: never drawn
    seen = {i for x in a for i in x}
    assert seen >= set(range(20)) | {20}  # every image of weight >= 1 appears in every epoch


def test_a_smaller_micro_batch_trains_on_the_same_images_in_every_step():
    """Out-of-memory recovery shrinks the micro-batch and raises accumulation: the plan (one unit per
    optimizer step) must not change, so every step learns from the same images."""
    plan = BucketBatchSampler([0] * 14 + [1] * 10, [1.0] * 24, 8, seed=3)  # 8 = micro 4 × accumulation 2
    as_4 = list(ResumableBatchSampler(plan, 2, micro_batch=4))
    as_2 = list(ResumableBatchSampler(plan, 2, micro_batch=2))
    assert [len(b) for b in as_4] == [4] * len(as_4) and len(as_2) == 2 * len(as_4)
    steps_4 = [sorted(as_4[k] + as_4[k + 1]) for k in range(0, len(as_4), 2)]
    steps_2 = [sorted(sum(as_2[k : k + 4], [])) for k in range(0, len(as_2), 4)]
    assert steps_4 == steps_2 == [sorted(u) for u in plan.epoch_batches(2)]
    # Resuming after 3 micro-batches of 4 (12 images) = after 6 micro-batches of 2.
    assert sum(ResumableBatchSampler(plan, 2, 3, micro_batch=4), []) == sum(
        ResumableBatchSampler(plan, 2, 6, micro_batch=2), []
    )


class PidDataset(torch.utils.data.Dataset):
    """Item i = (i, the pid of the process that loaded it)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, os.getpid()


def test_one_loader_with_persistent_workers_serves_every_epoch_and_a_new_micro_batch():
    from torch.utils.data import DataLoader

    from moas.data.loader import loader_kwargs

    plan = BucketBatchSampler([0] * 40, [1.0] * 40, 8, seed=2)
    batches = RunBatchSampler()
    loader = DataLoader(PidDataset(), batch_sampler=batches, **loader_kwargs(2, torch.device("cpu")))
    seen, pids = [], set()
    batches.position(ResumableBatchSampler(plan, 0, micro_batch=8))
    for k, (_idx, pid) in enumerate(loader):  # an epoch left early, as out-of-memory recovery leaves it
        pids |= set(pid.tolist())
        if k == 1:
            break
    for epoch, start, micro in ((0, 4, 4), (1, 0, 4), (2, 0, 8)):  # resumed at a step, then whole epochs
        batches.position(ResumableBatchSampler(plan, epoch, start, micro_batch=micro))
        got = []
        for idx, pid in loader:
            got.append(idx.tolist())
            pids |= set(pid.tolist())
        seen.append(got)
        assert got == list(ResumableBatchSampler(plan, epoch, start, micro_batch=micro))
    assert len(seen[0]) == len(ResumableBatchSampler(plan, 0, micro_batch=4)) - 4
    assert len(pids) == 2 and os.getpid() not in pids  # the same two worker processes all along
    del loader


def test_resumable_sampler_skips_and_shards_evenly():
    plan = BucketBatchSampler([0] * 40, [1.0] * 40, 4, seed=1)  # 10 batches
    full = plan.epoch_batches(0)
    assert list(ResumableBatchSampler(plan, 0, start_batch=7)) == full[7:]
    shards = [list(ResumableBatchSampler(plan, 0, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # equal counts: the 10th batch is dropped
    flat = [tuple(b) for s in shards for b in s]
    assert len(set(flat)) == 9 and set(flat) <= {tuple(b) for b in full}
    assert len(ResumableBatchSampler(plan, 0, start_batch=2, rank=1, world_size=3)) == 1
    assert steps_per_epoch(plan, 3) == 3 and steps_per_epoch(plan) == 10
    with pytest.raises(ValueError):
        ResumableBatchSampler(plan, 0, rank=3, world_size=3)


def test_oom_shrink_keeps_the_effective_batch():
    assert shrink_micro_batch(32, 1) == (16, 2)
    assert shrink_micro_batch(16, 2) == (8, 4)
    assert shrink_micro_batch(6, 2) == (4, 3)
    assert shrink_micro_batch(4, 3) == (3, 4)
    assert shrink_micro_batch(5, 1) == (1, 5)
    assert shrink_micro_batch(2, 4, min_batch=2) is None  # the original stops at batch 2
    assert shrink_micro_batch(1, 8) is None
    assert is_oom(torch.OutOfMemoryError("x")) and is_oom(RuntimeError("CUDA out of memory."))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_adaptive_rules():
    plateau = AdaptiveTrainingSystem(window=10)
    for _ in range(10):
        lr = plateau.observe(1.0, 1e-4)
    assert plateau.scale == pytest.approx(0.9) and lr == pytest.approx(0.9e-4)
    fast = AdaptiveTrainingSystem(window=10)
    for i in range(10):
        lr = fast.observe(1.0 - 0.03 * i, 1e-4)  # steady ~15 % drop, stable
    assert fast.scale == pytest.approx(1.05) and lr == pytest.approx(1.05e-4)
    assert fast.lr(9.9e-4) == pytest.approx(1e-3)  # the 1.05 rule is capped at 1e-3
    noisy = AdaptiveTrainingSystem(window=10)
    for loss in [0.1] * 9 + [5.0]:  # a loss spike: unstable (and no progress)
        noisy.observe(loss, 1e-4)
    assert noisy.last["stability_score"] < 0.5 and noisy.scale == pytest.approx(0.9 * 0.85)
    restored = AdaptiveTrainingSystem(window=10)
    restored.load_state_dict(noisy.state_dict())
    assert restored.scale == noisy.scale and restored.losses == []


def test_resource_manager_tables_and_snapshot():
    rm = EnhancedResourceManager(14.4, 11.4, 10, 8, "cpu")
    assert [rm.resolution_batch(16, r) for r in (256, 512, 768, 1024, 2048, 4096)] == [16, 16, 8, 4, 2, 2]
    assert rm.resolution_batch(2, 2048) == 1
    snap = rm.snapshot()
    assert snap.ram_total_gb > 0 and snap.process_rss_gb > 0 and snap.page_cache_gb >= 0
    assert 0 < rm.ram_fraction(snap) <= 1.0 and rm.vram_fraction(snap) == 0.0
    assert 1 <= rm.dynamic_batch_size(16, 512) <= 16
    assert rm.dynamic_batch_size(16, 512, bytes_per_image=1e15) == 1  # nothing fits: never below 1
    assert rm.get_optimal_resolution() in (512, 768)  # no GPU: 512 (768 impossible without VRAM)
    assert "rss_gb=" in rm.brief()


def test_resource_manager_cleanup_thresholds():
    rm = EnhancedResourceManager(10.0, 11.4, 2, 0, "cpu")
    snap = rm.snapshot()
    snap.ram_total_gb, snap.ram_available_gb = 100.0, 100.0
    for rss, want in ((5.0, None), (9.0, "soft"), (9.6, "aggressive")):
        snap.process_rss_gb = rss
        assert rm.cleanup_level(snap) == want
    snap.process_rss_gb, snap.ram_available_gb = 0.1, 20.0  # the machine is 80 % used by others: fine
    assert rm.cleanup_level(snap) is None
    snap.ram_available_gb = 4.0  # 96 % of the machine's memory in use (page cache excluded)
    assert rm.cleanup_level(snap) == "aggressive"
    rm.cleanup("aggressive")
    assert rm.cleanups["aggressive"] == 1


def test_l3_cache_lru_budget_and_stats():
    cache = L3CacheManager(budget_bytes=4000, max_entries=3)
    t = [torch.zeros(250) for _ in range(5)]  # 1000 bytes each
    for i in range(3):
        assert cache.put(i, t[i])
    assert cache.get(0) is t[0]  # 0 becomes most recent
    cache.put(3, t[3])  # entry limit 3: evicts the least recent, 1
    assert cache.get(1) is None and cache.get(0) is t[0]
    assert not cache.put("big", torch.zeros(600))  # 2400 bytes > half the budget: never cached
    cache.put(4, torch.zeros(500))  # 2000 bytes: evicts until it fits in 4000
    assert cache.bytes_used <= 4000
    s = cache.stats()
    assert s["hits"] == 2 and s["misses"] == 1 and s["evictions"] >= 2 and s["rejected"] == 1
    assert s["hit_rate"] == pytest.approx(2 / 3)
    calls = []
    assert cache.get_or_compute("k", lambda: calls.append(1) or torch.ones(2)).sum() == 2
    cache.get_or_compute("k", lambda: calls.append(1) or torch.ones(2))
    assert calls == [1]
    default = L3CacheManager()
    assert default.budget_bytes == 15 * 1024**2 and default.max_entries == 1500


def test_hpo_explores_then_exploits_inside_the_space():
    opt = AutomaticHyperparameterOptimizer(seed=3)
    for n in range(5):
        p = opt.suggest()
        assert p["batch_size"] in BATCH_CHOICES
        for k, (lo, hi, _) in CONTINUOUS.items():
            if k in p:
                assert lo <= p[k] <= hi
        opt.report(Trial(n, p, score=abs(math.log10(p["lr"]) + 4.0)))  # best near lr = 1e-4
    assert "dropout" not in p
    best = opt.best()
    top_lrs = sorted(t.params["lr"] for t in opt.trials)
    for _ in range(5):
        q = opt.suggest()
        # Exploitation stays inside the span of the top trials (± the largest 15 % perturbation).
        assert top_lrs[0] * 0.84 <= q["lr"] <= top_lrs[-1] * 1.16
    assert best.score == min(t.score for t in opt.trials)


def test_fault_spec_and_dist_env():
    f = FaultInjector("oom@2, nan_loss@3")
    f.next_batch()
    with pytest.raises(torch.OutOfMemoryError):
        f.next_batch()
    f.next_batch()
    assert f.fires("nan_loss") and not f.fires("nan_loss")
    from moas.errors import ConfigError

    with pytest.raises(ConfigError):
        FaultInjector("explode@1")
    ctx = context_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert ctx.enabled and not ctx.is_main and ctx.world_size == 2 and ctx.local_rank == 1
    assert context_from_env({}).all_max(3.0) == 3.0  # single process: no collective
    with pytest.raises(ConfigError):
        context_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    assert milestone_epochs(260) == {40, 80, 120, 160, 200, 230, 260}


def test_graceful_stop_sets_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM and stop.count == 2
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_real_folder_run_on_a_machine_with_ram_to_spare_cleans_up_nothing(monkeypatch):
    """The CPU profile with a 3.9 GB process (its RAM cache and tag model) on a 24 GB machine with 18 GB
    free: the budget is sized to the machine, so no cleanup runs. With the old fixed 4 GB budget every step
    ran one ("95 % of budget")."""
    from moas import config_sections
    from moas.config import load_config
    from moas.resources import ResourceSnapshot

    monkeypatch.setattr(config_sections, "this_machine", lambda: (24.0, 2))
    rc = load_config("cpu_tiny", use_env=False).resources
    snap = ResourceSnapshot(
        process_rss_gb=3.9,
        ram_used_gb=6.0,
        page_cache_gb=2.0,
        ram_available_gb=18.0,
        ram_total_gb=24.0,
        cpu_percent=100.0,
    )
    assert EnhancedResourceManager.from_config(rc, torch.device("cpu")).cleanup_level(snap) is None
    fixed = EnhancedResourceManager(4.0, 0.0, 2, 0, "cpu")
    assert fixed.cleanup_level(snap) == "aggressive"  # what the fixed budget did at every step
    # A machine that is really short of RAM still cleans up, whatever the budget.
    short = ResourceSnapshot(3.9, 15.5, 0.2, 0.5, 16.0, 100.0)
    assert EnhancedResourceManager.from_config(rc, torch.device("cpu")).cleanup_level(short) == "aggressive"
