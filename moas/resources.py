"""Resource management: the original's EnhancedResourceManager and L3CacheManager.

EnhancedResourceManager reads RAM (psutil), CPU and VRAM (torch.cuda) live. RAM is reported two ways: the
*process* resident set, and the *system* figure split into memory used by programs and the OS page cache
(file data the kernel drops on demand, so it is not pressure). Cleanup runs at the original's thresholds —
RAM soft 90 % / aggressive 95 %, VRAM soft 92 % / aggressive 95 % (of the budget) — soft is one
``gc.collect()``, aggressive is two plus ``torch.cuda.empty_cache()`` and a synchronize. The dynamic batch
size follows the original's resolution table (512 full, 768 ½, 1024 ¼, 2048 ⅛, minimum 1) and shrinks
further when free memory is short; ``get_optimal_resolution`` maps free VRAM to a resolution.

L3CacheManager is a byte-budgeted LRU (OrderedDict) for small tensors reused at inference.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import psutil
import torch

log = logging.getLogger(__name__)
GB = 1024**3

RAM_SOFT, RAM_AGGRESSIVE = 0.90, 0.95
VRAM_SOFT, VRAM_AGGRESSIVE = 0.92, 0.95
RESOLUTION_DIVISORS = ((512, 1), (768, 2), (1024, 4), (2048, 8))  # side ≤ key → batch // divisor


@dataclass
class ResourceSnapshot:
    process_rss_gb: float  # this process's resident memory
    ram_used_gb: float  # memory used by all programs (excludes page cache and buffers)
    page_cache_gb: float  # OS file cache: reclaimable, not memory pressure
    ram_available_gb: float  # what the OS can hand out now (free + reclaimable cache)
    ram_total_gb: float
    cpu_percent: float
    vram_allocated_gb: float = 0.0  # tensors alive
    vram_reserved_gb: float = 0.0  # held by PyTorch's caching allocator
    vram_free_gb: float = 0.0  # free on the device (driver view)
    vram_total_gb: float = 0.0


class EnhancedResourceManager:
    """Budgets from the profile (``[resources]``): ``max_ram_gb``, ``max_vram_gb``, ``cpu_threads``, ``loader_workers``."""

    def __init__(
        self,
        max_ram_gb: float = 14.4,
        max_vram_gb: float = 11.4,
        cpu_threads: int = 10,
        loader_workers: int = 8,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_ram_gb = max_ram_gb
        self.max_vram_gb = max_vram_gb
        self.cpu_threads = max(1, min(cpu_threads, os.cpu_count() or 1))
        self.loader_workers = max(0, min(loader_workers, self.cpu_threads))
        self.device = torch.device(device)
        self.process = psutil.Process()
        self.cleanups = {"soft": 0, "aggressive": 0}

    @classmethod
    def from_config(cls, rc: Any, device: torch.device) -> EnhancedResourceManager:
        return cls(rc.max_ram_gb, rc.max_vram_gb, rc.cpu_threads, rc.loader_workers, device)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def snapshot(self) -> ResourceSnapshot:
        vm = psutil.virtual_memory()
        cache = (getattr(vm, "cached", 0) or 0) + (getattr(vm, "buffers", 0) or 0)
        snap = ResourceSnapshot(
            process_rss_gb=self.process.memory_info().rss / GB,
            ram_used_gb=vm.used / GB,
            page_cache_gb=cache / GB,
            ram_available_gb=vm.available / GB,
            ram_total_gb=vm.total / GB,
            cpu_percent=psutil.cpu_percent(interval=None),
        )
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            snap.vram_allocated_gb = torch.cuda.memory_allocated(self.device) / GB
            snap.vram_reserved_gb = torch.cuda.memory_reserved(self.device) / GB
            snap.vram_free_gb, snap.vram_total_gb = free / GB, total / GB
        return snap

    def ram_fraction(self, snap: ResourceSnapshot) -> float:
        """RAM pressure: this process against its budget, or the machine's non-reclaimable use, whichever
        is higher. Page cache counts as free (the OS drops it on demand), so reading a large data set
        through the cache never triggers a cleanup."""
        budget = min(self.max_ram_gb or snap.ram_total_gb, snap.ram_total_gb)
        machine = 1.0 - snap.ram_available_gb / max(snap.ram_total_gb, 1e-9)
        return max(snap.process_rss_gb / max(budget, 1e-9), machine)

    def vram_fraction(self, snap: ResourceSnapshot) -> float:
        """VRAM pressure: what live tensors hold against the budget. Not what the allocator has reserved: a
        run planned to the card keeps its cache near the budget by design and reuses it, so emptying the
        cache would only make it allocate again (and synchronise every step)."""
        if not self.cuda:
            return 0.0
        budget = min(self.max_vram_gb or snap.vram_total_gb, snap.vram_total_gb)
        return snap.vram_allocated_gb / max(budget, 1e-9)

    def cleanup_level(self, snap: ResourceSnapshot) -> str | None:
        ram, vram = self.ram_fraction(snap), self.vram_fraction(snap)
        if ram >= RAM_AGGRESSIVE or vram >= VRAM_AGGRESSIVE:
            return "aggressive"
        if ram >= RAM_SOFT or vram >= VRAM_SOFT:
            return "soft"
        return None

    def cleanup(self, level: str) -> None:
        gc.collect()
        if level == "aggressive":
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
                torch.cuda.synchronize(self.device)
        self.cleanups[level] += 1

    def maybe_cleanup(self, snap: ResourceSnapshot | None = None) -> str | None:
        """Check the thresholds (on ``snap``, or a new snapshot) and clean up if one is crossed; returns the
        level applied (or None)."""
        snap = snap or self.snapshot()
        level = self.cleanup_level(snap)
        if level:
            log.info(
                "Memory at RAM %.0f%% / VRAM %.0f%% of budget: %s cleanup.",
                100 * self.ram_fraction(snap),
                100 * self.vram_fraction(snap),
                level,
            )
            self.cleanup(level)
        return level

    @staticmethod
    def resolution_batch(base_batch: int, resolution: int) -> int:
        """The original's table: ≤512 px full batch, 768 ½, 1024 ¼, 2048 (and above) ⅛; at least 1."""
        divisor = next((d for side, d in RESOLUTION_DIVISORS if resolution <= side), 8)
        return max(1, base_batch // divisor)

    def dynamic_batch_size(
        self, base_batch: int, resolution: int, bytes_per_image: float | None = None
    ) -> int:
        """The resolution-table batch, lowered to what live free memory holds (``bytes_per_image`` measured or estimated)."""
        batch = self.resolution_batch(base_batch, resolution)
        snap = self.snapshot()
        # Without a measurement: activations of a diffusion U-Net, roughly 4 kB per pixel in fp32.
        per_image = bytes_per_image or 4096.0 * resolution * resolution
        if self.cuda:
            headroom = min(snap.vram_free_gb, max(self.max_vram_gb - snap.vram_reserved_gb, 0.0)) * GB
        else:
            headroom = min(snap.ram_available_gb, max(self.max_ram_gb - snap.process_rss_gb, 0.0)) * GB
        fits = int(headroom // per_image)
        return max(1, min(batch, fits))

    def get_optimal_resolution(self) -> int:
        """Free VRAM > 8 GB → 2048, > 5 GB → 1024, > 2 GB → 768, else 512; one step lower when RAM < 4 GB."""
        snap = self.snapshot()
        free = snap.vram_free_gb if self.cuda else 0.0
        free = min(free, self.max_vram_gb) if self.max_vram_gb else free
        ladder = (2048, 1024, 768, 512)
        idx = 0 if free > 8 else 1 if free > 5 else 2 if free > 2 else 3
        if snap.ram_available_gb < 4:
            idx = min(idx + 1, len(ladder) - 1)
        return ladder[idx]

    def log_start(self, resolution: int, base_batch: int) -> None:
        """One line at the start of a run: what is free, and the resolution table's batch."""
        snap = self.snapshot()
        log.info(
            "Resources: RAM %.1f GB available (process %.1f GB, page cache %.1f GB)%s; "
            "resolution-table batch at %d px: %d.",
            snap.ram_available_gb,
            snap.process_rss_gb,
            snap.page_cache_gb,
            f", VRAM {snap.vram_free_gb:.1f} of {snap.vram_total_gb:.1f} GB free" if self.cuda else "",
            resolution,
            self.resolution_batch(base_batch, resolution),
        )

    def brief(self, snap: ResourceSnapshot | None = None) -> str:
        """One line for performance.log (of ``snap``, or a new snapshot)."""
        s = snap or self.snapshot()
        line = (
            f"rss_gb={s.process_rss_gb:.2f} ram_used_gb={s.ram_used_gb:.2f} page_cache_gb={s.page_cache_gb:.2f} "
            f"ram_avail_gb={s.ram_available_gb:.2f} cpu_pct={s.cpu_percent:.0f}"
        )
        if self.cuda:
            line += f" vram_alloc_gb={s.vram_allocated_gb:.2f} vram_reserved_gb={s.vram_reserved_gb:.2f}"
        return line


def inference_cache_key(module: torch.nn.Module, tag: str, *tensors: torch.Tensor) -> tuple | None:
    """Key for caching ``module``'s output on these inputs in an attached ``L3CacheManager`` (its ``cache``
    attribute), or None when caching does not apply: no cache, training mode, or gradients enabled.

    The key holds the inputs' content digest and the sum of the parameters' version counters, which every
    in-place update bumps, so changed weights never return a stale output."""
    if getattr(module, "cache", None) is None or module.training or torch.is_grad_enabled():
        return None
    weights = sum(p._version for p in module.parameters())
    h = hashlib.blake2b(digest_size=16)
    parts: list = [tag, id(module), weights]
    for x in tensors:
        h.update(x.detach().to("cpu").contiguous().numpy().tobytes())
        parts += [tuple(x.shape), str(x.dtype)]
    return (*parts, h.hexdigest())


class L3CacheManager:
    """LRU cache of tensors with a byte budget (the original's 15 MB, 1,500 entries).

    A tensor larger than half the budget is never cached (it would evict everything else: thrashing).
    Values are stored as given (no copy), so callers must not modify cached tensors in place.
    """

    def __init__(self, budget_bytes: int = 15 * 1024**2, max_entries: int = 1500) -> None:
        if budget_bytes < 1 or max_entries < 1:
            raise ValueError("the cache needs a positive byte budget and entry limit")
        self.budget_bytes = budget_bytes
        self.max_entries = max_entries
        self._data: OrderedDict[Any, tuple[torch.Tensor, int]] = OrderedDict()
        self.bytes_used = 0
        self.hits = self.misses = self.evictions = self.rejected = 0

    @staticmethod
    def nbytes(t: torch.Tensor) -> int:
        return t.element_size() * t.nelement()

    def get(self, key: Any) -> torch.Tensor | None:
        item = self._data.get(key)
        if item is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: Any, value: torch.Tensor) -> bool:
        """Cache ``value``; False when it is too large to cache (over half the budget)."""
        size = self.nbytes(value)
        if size > self.budget_bytes // 2:
            self.rejected += 1
            return False
        if key in self._data:
            self.bytes_used -= self._data.pop(key)[1]
        while self._data and (
            self.bytes_used + size > self.budget_bytes or len(self._data) >= self.max_entries
        ):
            _, (_, old) = self._data.popitem(last=False)
            self.bytes_used -= old
            self.evictions += 1
        self._data[key] = (value, size)
        self.bytes_used += size
        return True

    def get_or_compute(self, key: Any, fn) -> torch.Tensor:
        hit = self.get(key)
        if hit is not None:
            return hit
        value = fn()
        self.put(key, value)
        return value

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()
        self.bytes_used = 0

    def stats(self) -> dict[str, float]:
        lookups = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "rejected": self.rejected,
            "entries": len(self._data),
            "bytes": self.bytes_used,
            "hit_rate": self.hits / lookups if lookups else 0.0,
            "miss_rate": self.misses / lookups if lookups else 0.0,
        }
