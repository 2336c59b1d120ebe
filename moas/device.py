"""Process set-up shared by the commands: the device, intra-op threads, the autocast dtype, and seeding."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from moas.errors import ConfigError


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


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else the platform's), or "CPU"."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def hardware_name(device: torch.device) -> str:
    """What a run trained on, for a person: the GPU's name and memory, or the CPU's name and cores."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GB)"
    if device.type == "mps":
        return f"Apple GPU (mps), {cpu_name()}"
    return f"{cpu_name()}, {os.cpu_count()} cores (CPU)"
