"""Process set-up shared by the commands: the device, intra-op threads, the autocast dtype, and seeding."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

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


def host_work():
    """A context for the work that runs on the host with real values (the sampler's schedule, text encoding).
    In a run it changes nothing. Under the fake-CUDA checks (``FakeTensorMode``: tensors without storage, so
    nothing can be read) it steps out of the fake mode, as this work steps off the GPU in a real run."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX): there bf16 autocast is ~20 % faster
    than fp32 per step; elsewhere it is emulated and slower. Read from /proc/cpuinfo (False elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def autocast_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype: bf16 where supported, else fp16 (with a GradScaler); None = fp32.

    On the CPU ``auto`` means fp32, so the tests' pinned numbers stay as they are; ``native`` means bf16
    where the CPU has bf16 instructions, else fp32 (the CPU profile's choice: faster, never slower); an
    explicit ``bf16`` or ``fp16`` is honoured, which lets the tests run the mixed-precision path without a
    GPU. On CUDA ``native`` is ``auto``."""
    if mode == "no" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cpu":
        if mode == "native":
            return torch.bfloat16 if cpu_has_native_bf16() else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    # Only native bf16 (Ampere and later): Turing and Volta emulate it, slower than fp16 with a scaler.
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    if mode == "bf16" or (mode in ("auto", "native") and native):
        return torch.bfloat16
    return torch.float16


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype generation runs its networks in, decided once per pipeline: on a CUDA GPU with
    native bf16 (Ampere and later) ``auto`` is bf16 (the samplers still step in float32); elsewhere, and
    with ``fp32``, None (float32). On CUDA, float32 matrix products are allowed TF32 (cuDNN convolutions
    already use it by default)."""
    if precision not in ("auto", "fp32"):
        raise ConfigError(f"precision must be auto or fp32, got {precision!r}.")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = True
    if precision == "auto" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return None


def autocast_or_not(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device`` in ``dtype``, or a context that changes nothing for None."""
    from contextlib import nullcontext

    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


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


# The rtx3060_12gb profile is sized for a 12 GB card with about 0.6 GB reserved; below this, the small
# profile is the one that fits.
GPU_PROFILE_MIN_GB = 10.0
PROFILE_NAMES = ("cpu_tiny", "rtx3060_12gb", "original")


@dataclass(frozen=True)
class ProfileChoice:
    """The hardware profile a run without ``--profile`` gets, why, and the device it puts the run on."""

    profile: str
    reason: str
    overrides: dict = field(default_factory=dict)  # config values on top of the profile (the device)

    def notice(self) -> str:
        others = "|".join(p for p in PROFILE_NAMES if p != self.profile)
        return (
            f"No --profile given: {self.reason}, so this run uses the {self.profile} profile "
            f"(choose another with --profile {others})."
        )


def choose_profile(cuda_gb: float | None, cuda_name: str = "", mps: bool = False) -> ProfileChoice:
    """The profile for a machine: ``cuda_gb`` is the first CUDA GPU's memory (None: no CUDA GPU)."""
    if cuda_gb is not None and cuda_gb >= GPU_PROFILE_MIN_GB:
        if cuda_gb <= 12.5:
            return ProfileChoice("rtx3060_12gb", f"found {cuda_name} with {cuda_gb:.0f} GB")
        # A larger card: the same model and effective batch; the memory plan gets the card's memory (less
        # the same 0.6 GB reserve), so it can take larger micro-batches with less accumulation.
        budget = round(cuda_gb - 0.6, 1)
        return ProfileChoice(
            "rtx3060_12gb",
            f"found {cuda_name} with {cuda_gb:.0f} GB; the memory plan may use {budget} GB of it",
            {"resources": {"max_vram_gb": budget}},
        )
    if cuda_gb is not None:
        return ProfileChoice(
            "cpu_tiny",
            f"found {cuda_name} with {cuda_gb:.1f} GB, under the {GPU_PROFILE_MIN_GB:.0f} GB the "
            "rtx3060_12gb profile needs; the small model trains on that GPU",
            {"resources": {"device": "cuda"}},
        )
    if mps:
        return ProfileChoice(
            "cpu_tiny",
            "found an Apple GPU (mps) and no CUDA GPU; the small model trains on it",
            {"resources": {"device": "mps"}},
        )
    return ProfileChoice("cpu_tiny", "no CUDA GPU found; the 32-px demo-sized model trains on the CPU")


def detect_profile() -> ProfileChoice:
    """``choose_profile`` for this machine."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return choose_profile(props.total_memory / 2**30, props.name)
    mps = getattr(torch.backends, "mps", None)
    return choose_profile(None, mps=bool(mps and mps.is_available()))
