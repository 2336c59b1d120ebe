"""Numbered run folders: ``runs/NNN-<profile>/`` (TensorBoard, the resolved config, sample grids)."""

from __future__ import annotations

from pathlib import Path


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
