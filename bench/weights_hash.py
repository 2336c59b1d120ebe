"""Bit-identity check: SHA-256 of everything a fixed-seed short training run saves.

    python bench/weights_hash.py            # prints one hash per configuration

Two runs of 20 optimizer steps on demo data, one thread: ``plain`` is ``tests/golden.toml`` (the frozen
tiny configuration, whole brain and enhancer) as it is; ``everything`` turns on the paths the plain run
skips (gradient accumulation, domain losses, the discriminator, style tokens, caption shuffling/dropout,
panel sequences for the memory expert); ``sr`` trains the cascade's super-resolution stage beside the
generator; ``stage sr`` trains the stage alone on the ``plain`` run's model (``moas train --stage sr``).
The hash covers the generator, its EMA, the optimizer and
schedule, the discriminator and enhancer states and the step generator of the last checkpoint, in sorted
key order. Compare the hashes printed before and after a change that must not alter training, on the same
machine and thread count.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from moas.config import load_config  # noqa: E402
from moas.data.synthetic import generate_demo_dataset  # noqa: E402
from moas.monitor.logs import setup_logging  # noqa: E402
from moas.train.loop import train  # noqa: E402

TINY = Path(__file__).resolve().parent.parent / "tests" / "golden.toml"
STEPS = 20

EVERYTHING = {
    "data": {"extract_style": True, "shuffle_tags": True, "tag_dropout": 0.2, "caption_dropout": 0.1},
    "train": {"grad_accum_steps": 2},
    "losses": {"domain": True, "adversarial": True, "disc_warmup_steps": 5},
}
SR = {
    "sr": {
        "train": True,
        "every": 2,
        "crop": 32,
        "block_channels": [16, 32],
        "attention": [False, True],
        "batch_size": 2,
        "scale": 2,
    },
}


def digest(value, h) -> None:
    """Feed tensors and plain values to ``h`` in a fixed order."""
    if isinstance(value, torch.Tensor):
        h.update(str((value.dtype, tuple(value.shape))).encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            digest(value[k], h)
    elif isinstance(value, list | tuple):
        for v in value:
            digest(v, h)
    else:
        h.update(repr(value).encode())


def run(root: Path, data: Path, extra: dict) -> str:
    over = {
        "data": {"data_dir": str(data), "cache_dir": str(root / "cache"), **extra.get("data", {})},
        "train": {
            "checkpoint_dir": str(root / "ckpt"),
            "run_dir": str(root / "runs"),
            "save_path": str(root / "models" / "best_model.pt"),
            "log_dir": str(root / "logs"),
            "epochs": 6,
            "max_steps": STEPS,
            "save_every": 2,
            "sample_every": 0,
            "seed": 5,
            **extra.get("train", {}),
        },
        "resources": {"cpu_threads": 1},
        **{k: v for k, v in extra.items() if k not in ("data", "train")},
    }
    result = train(load_config(None, TINY, over, use_env=False), progress=False)
    assert result.global_step == STEPS, result.global_step
    # The checkpoint of the last step, whatever its name (an epoch end or max_steps mid-epoch).
    sidecars = [
        p for p in (root / "ckpt").glob("*.json") if json.loads(p.read_text())["global_step"] == STEPS
    ]
    state = torch.load(sidecars[0].with_suffix(""), map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    keys = ("model", "ema", "optimizer", "scheduler", "domain", "train_rng", "epoch", "batch_in_epoch", "sr")
    for key in keys:
        if key in state:
            h.update(key.encode())
            digest(state[key], h)
    return h.hexdigest()


def run_stage_sr(root: Path, data: Path, base_model: Path) -> str:
    """``moas train --stage sr`` for STEPS steps on ``base_model``: the hash of the stage in its last
    checkpoint."""
    over = {
        "data": {"data_dir": str(data), "cache_dir": str(root / "cache")},
        "train": {
            "checkpoint_dir": str(root / "ckpt"),
            "save_path": str(root / "models" / "with_sr.safetensors"),
            "run_dir": str(root / "runs"),
            "log_dir": str(root / "logs"),
            "init_from": str(base_model),
            "stage": "sr",
            "max_steps": STEPS,
            "seed": 5,
        },
        "resources": {"cpu_threads": 1},
        **SR,
    }
    result = train(load_config(None, TINY, over, use_env=False), progress=False)
    assert result.global_step == STEPS, result.global_step
    sidecars = [
        p for p in (root / "ckpt").rglob("*.json") if json.loads(p.read_text())["global_step"] == STEPS
    ]
    state = torch.load(sidecars[0].with_suffix(""), map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    digest(state["sr"], h)
    return h.hexdigest()


def main() -> int:
    setup_logging(None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_demo_dataset(root / "demo", n_images=40, size=32, seed=3, progress=False)
        generate_demo_dataset(root / "seq", n_images=24, size=32, seed=4, sequences=6, progress=False)
        print("plain     ", run(root / "plain", root / "demo" / "train", {}))
        print("everything", run(root / "all", root / "seq" / "train", EVERYTHING))
        print("sr        ", run(root / "sr", root / "demo" / "train", SR))
        models = (root / "plain" / "models").glob("best_model.*")
        base = next(p for p in models if p.suffix in (".safetensors", ".pt"))
        print("stage sr  ", run_stage_sr(root / "stage", root / "demo" / "train", base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
