"""Process-level setup shared by the commands: logging, seeds, device, threads, numbered run folders."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from moas.errors import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(
    log_dir: str | Path | None = None, verbose: bool = False, quiet_console: bool = False
) -> None:
    """Console at INFO (WARNING for noisy libraries) and, with ``log_dir``, the original's four log files.

    ``main.log``: everything at INFO (DEBUG with --verbose). ``error.log``: errors with context and
    recovery status (out of memory, emergency checkpoints, crashes with traceback). ``performance.log``:
    one line per optimizer step with timing and live resources (logger ``moas.performance``, not shown on
    the console). ``diagnosis.log``: the start-up health checks (logger ``moas.diagnosis``, also
    ``moas doctor``). ``quiet_console`` shows only warnings (non-zero DDP ranks).
    """
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_moas", False):
            root.removeHandler(h)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    console.setLevel(logging.WARNING if quiet_console else logging.DEBUG if verbose else logging.INFO)
    handlers: list[logging.Handler] = [console]
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        main = logging.FileHandler(Path(log_dir) / "main.log", encoding="utf-8")
        main.setFormatter(logging.Formatter(LOG_FORMAT))
        err = logging.FileHandler(Path(log_dir) / "error.log", encoding="utf-8")
        err.setLevel(logging.ERROR)
        err.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers += [main, err]
    for h in handlers:
        h._moas = True  # type: ignore[attr-defined]
        root.addHandler(h)
    for name, file in (("moas.performance", "performance.log"), ("moas.diagnosis", "diagnosis.log")):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if getattr(h, "_moas", False):
                lg.removeHandler(h)
                h.close()
        lg.propagate = False  # per-step lines would drown main.log and the console
        lg.setLevel(logging.INFO)
        if log_dir is not None:
            fh = logging.FileHandler(Path(log_dir) / file, encoding="utf-8")
            fh.setFormatter(logging.Formatter(LOG_FORMAT))
            fh._moas = True  # type: ignore[attr-defined]
            lg.addHandler(fh)
    for noisy in ("sentence_transformers", "transformers", "diffusers", "urllib3", "huggingface_hub", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    """One seed drives ``random``, ``numpy`` and ``torch``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"Device {name} was requested but CUDA is not available on this machine.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"'{name}' is not a valid device (use auto, cpu, cuda or cuda:N).") from None


def set_threads(cpu_threads: int) -> int:
    """Use at most ``cpu_threads`` intra-op threads, never more than the machine has."""
    n = max(1, min(cpu_threads, os.cpu_count() or 1))
    torch.set_num_threads(n)
    return n


def autocast_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype: bf16 where supported, else fp16 (with a GradScaler); None = fp32 (CPU)."""
    if device.type != "cuda" or mode == "no":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def new_run_dir(root: str | Path, name: str) -> Path:
    """``runs/NNN-name``: numbered so runs sort by start and never collide."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    nums = [
        int(p.name.split("-", 1)[0])
        for p in root.iterdir()
        if p.is_dir() and p.name.split("-", 1)[0].isdigit()
    ]
    run = root / f"{(max(nums) + 1) if nums else 0:03d}-{name}"
    run.mkdir()
    return run
