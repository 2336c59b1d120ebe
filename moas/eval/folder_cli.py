"""``moas eval`` on any folder: which images were held out, the folder's tag model, and the folder eval.

When the folder is the one the model was trained on (its provenance says so), the held-out images are the
ones training held out (the same seed-fixed split), so the prompts are captions the model never trained
on and memorisation is measured against the images it did train on. For any other folder every image is
both a prompt source and the comparison set, and the result says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from moas.config import MonitorConfig
from moas.data.dataset import ArtDataset
from moas.eval.folder_eval import run_folder_eval
from moas.eval.tagger import load_or_train_tagger
from moas.eval.validate import join_subsets, split_holdout

log = logging.getLogger(__name__)


def _same_folder(a: str | Path | None, b: str | Path) -> bool:
    if not a:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def folder_split(pipe, dataset: ArtDataset, data_dir: str | Path):
    """(joined dataset, train indices, held-out indices, how the split was chosen)."""
    cfg = pipe.model_config or {}
    mon = {**MonitorConfig().__dict__, **(cfg.get("monitor") or {})}
    seed = int(pipe.provenance.get("seed", (cfg.get("train") or {}).get("seed", 0)))
    if _same_folder(pipe.provenance.get("data_dir"), data_dir) and not (cfg.get("data") or {}).get("val_dir"):
        train, val = split_holdout(dataset, mon["val_fraction"], seed, mon["val_min_images"])
        if val is not None:
            joined, train_idx, held_idx = join_subsets(train, val)
            return joined, train_idx, held_idx, f"the {len(val)} images training held out (seed {seed})"
        everything = list(range(len(dataset)))
        return (
            dataset,
            everything,
            everything,
            "no images were held out in training: prompts are seen captions",
        )
    everything = list(range(len(dataset)))
    return dataset, everything, everything, "a folder the model was not trained on: all its images"


def image_folder(data_dir: str | Path) -> Path:
    """The image folder of ``data_dir``: the demo layout keeps its training images in ``train/``."""
    base = Path(data_dir)
    return base / "train" if (base / "manifest.json").is_file() and (base / "train").is_dir() else base


def eval_folder(
    pipe,
    data_dir: str | Path,
    n: int,
    steps: int | None,
    guidance_scale: float | None,
    sampler: str | None,
    seed: int,
    progress: bool,
    image_dir: str | Path | None = None,
) -> dict:
    """Validate ``data_dir``, split it, load or train its tag model and run the folder eval."""
    data_cfg = (pipe.model_config or {}).get("data") or {}
    names = bool(data_cfg.get("captions_from_names", False))  # as the model was trained
    dataset = ArtDataset(
        data_dir, pipe.resolution, data_cfg.get("cache_dir", "cache/preprocessed"), captions_from_names=names
    )
    dataset.validate(progress=progress)
    joined, train_idx, held_idx, how = folder_split(pipe, dataset, data_dir)
    # The training run's seed: the tag model it trained for best-step selection is found and reused.
    tag_seed = int(pipe.provenance.get("seed", ((pipe.model_config or {}).get("train") or {}).get("seed", 0)))
    mon = (pipe.model_config or {}).get("monitor") or {}
    budget = int(mon.get("tagger_steps", MonitorConfig().tagger_steps))  # part of the cache key
    tagger = load_or_train_tagger(joined, seed=tag_seed, progress=progress, max_steps=budget)
    result = run_folder_eval(
        pipe,
        joined,
        tagger,
        held_idx,
        train_idx,
        n=n,
        steps=steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        seed=seed,
        progress=progress,
        image_dir=image_dir,
    )
    result["split"] = how
    return result
