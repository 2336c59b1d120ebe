"""What a training folder holds, in a few numbers a person reads: image count, caption coverage, the
most frequent tags and the weight each subfolder gets (``N_name`` repeats × ``multiply.txt``).

Written into the model file's provenance, so the model card can say what the model was trained on.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from moas.data.sampler import sample_weights
from moas.text.encoder import split_tags

TOP_TAGS = 20


def data_summary(
    paths: list[Path], captions: list[str], root: Path, held_out: int = 0, top: int = TOP_TAGS
) -> dict[str, Any]:
    """The summary of the training images ``paths`` (with their ``captions``) under ``root``."""
    captioned = sum(1 for c in captions if c.strip())
    tags = Counter(t for c in captions for t in dict.fromkeys(split_tags(c)))  # once per image
    folders: dict[str, dict[str, float]] = {}
    for path, weight in zip(paths, sample_weights(paths, root), strict=True):
        rel = path.parent.relative_to(root).as_posix() if path.parent != root else "."
        entry = folders.setdefault(rel, {"images": 0, "weight": weight})
        entry["images"] += 1
        entry["weight"] = max(entry["weight"], weight)  # multiply.txt is per folder; repeats per path
    return {
        "folder": str(root),
        "images": len(paths),
        "held_out": held_out,
        "captioned": captioned,
        "caption_coverage": round(captioned / len(paths), 4) if paths else 0.0,
        "top_tags": [[t, n] for t, n in tags.most_common(top)],
        "folders": dict(sorted(folders.items())),
    }
