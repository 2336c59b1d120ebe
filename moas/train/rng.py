"""RNG states in checkpoints, and the non-finite check run before every save.

:func:`capture_rng_state` turns the Python, NumPy, torch CPU and CUDA generator states into tensors and
plain values (so they survive a weights-only load); :func:`restore_rng_state` validates everything before
changing any global generator, and treats a state it cannot restore as an error.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """Capture Python, NumPy, torch CPU and CUDA RNG states as tensors and plain values.

    The result survives a ``save_checkpoint`` / weights-only ``load_checkpoint`` round trip.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch_cpu": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def _ints(t: Any, what: str) -> list[int]:
    if not (isinstance(t, torch.Tensor) and t.dim() == 1 and not (t.is_floating_point() or t.is_complex())):
        raise ValueError(f"malformed RNG state: {what} must be a 1-D integer tensor")
    return t.detach().cpu().tolist()


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore states from :func:`capture_rng_state`; an unrestorable state is an error, never skipped.

    Every part is first applied to a throwaway generator, so a malformed state raises ValueError
    before any global generator changes. CUDA states: a checkpoint written on GPUs needs as many
    visible GPUs to resume (ValueError otherwise, even for a CPU run, because the randomness it
    recorded would be lost); a checkpoint written on a CPU has none, and a GPU run resuming it keeps
    the CUDA generators seeded by ``seed_everything`` (training draws its noise from a checkpointed
    CPU generator, so this does not change the resumed steps).
    """
    try:
        py, npy, cpu, cuda = state["python"], state["numpy"], state["torch_cpu"], state["cuda"]
        py_state = (py["version"], tuple(_ints(py["state"], "python state")), py["gauss_next"])
        if py_state[2] is not None and type(py_state[2]) is not float:
            raise ValueError("python gauss_next must be a float or None")
        pos = npy["pos"]
        if type(pos) is not int or not 0 <= pos <= 624:
            raise ValueError(f"numpy pos {pos!r} out of range")
        np_keys = np.asarray(_ints(npy["keys"], "numpy keys"), dtype=np.uint32)
        np_state = (npy["kind"], np_keys, pos, int(npy["has_gauss"]), float(npy["cached_gaussian"]))
        if not (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8):
            raise ValueError("torch_cpu must be a uint8 tensor")
        if not (
            isinstance(cuda, list | tuple)
            and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)
        ):
            raise ValueError("cuda must be a list of uint8 tensors")
        cpu = cpu.detach().cpu()
        # Dry runs: the generators' own setters are the authority on what a valid state is.
        random.Random().setstate(py_state)
        np.random.RandomState().set_state(np_state)
        torch.Generator().set_state(cpu)
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise ValueError(f"malformed RNG state: {exc}") from exc

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda and count < len(cuda):
        raise ValueError(
            f"the checkpoint holds CUDA RNG states for {len(cuda)} GPU(s) but {count} are visible here; "
            "resume on a machine with as many GPUs"
        )
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(cpu)
    for i, t in enumerate(cuda):
        torch.cuda.set_rng_state(t.detach().cpu(), device=i)


def nonfinite_tensor(state: Any, where: str = "state") -> str | None:
    """The key path of the first floating-point tensor in ``state`` holding NaN/Inf, or None."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            return where
        return None
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, list | tuple):
        items = enumerate(state)
    else:
        return None
    for k, v in items:
        found = nonfinite_tensor(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None
