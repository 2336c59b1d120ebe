"""The folder's tag model, trained from scratch on its own captions, cached next to the data and reused.

This is the tag model's public entry point (it re-exports :mod:`moas.eval.tag_model` and
:mod:`moas.eval.tag_train`). :func:`load_or_train_tagger` keys a trained tag model on the sorted (relative
path, file size, caption) list of the images it trains on, the settings and ``VERSION``, and keeps it in
``<data folder>/.moas/tag_model.safetensors`` (weights; vocabulary, split, metrics and key in the
metadata; a folder that cannot be written falls back to ``cache_dir`` or the system temp folder): an
unchanged folder loads it in well under a second, a changed one retrains, an unreadable file is logged and
retrained.

Captions that ``moas caption`` wrote itself are recorded in ``.moas/auto_captions.json`` and never train the
tag model (it would learn its own guesses); edited by hand, they count as the user's again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from moas.eval.tag_model import (  # noqa: F401 (re-exported: moas.eval.tagger is the public entry point)
    INPUT_SIZE,
    TagModel,
    TagVocab,
    caption_tags,
    prepare,
    resize_images,
    tag_metrics,
    to_unit_range,
)
from moas.eval.tag_train import (  # noqa: F401 (re-exported)
    DEFAULT_STEPS,
    HELDOUT_FRACTION,
    MIN_CAPTIONED,
    MIN_TAGS,
    TrainedTagger,
    auto_epochs,
    check_trainable,
    free_threads,
    split_indices,
    train_tag_model,
)
from moas.io import atomic_write_bytes

log = logging.getLogger(__name__)

VERSION = 2  # bump when training or the model changes, so older cache files retrain
FORMAT = "moas-tagger-v1"
CACHE_NAME = "tag_model.safetensors"
AUTO_CAPTIONS = "auto_captions.json"


def rel_path(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def read_auto_captions(root: str | Path) -> dict[str, str]:
    """Relative image path → the caption ``moas caption`` wrote for it ({} when there is no record)."""
    p = Path(root) / ".moas" / AUTO_CAPTIONS
    if not p.is_file():
        return {}
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
        return {str(k): str(v) for k, v in record["captions"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s is unreadable; every caption in the folder is treated as the user's.", p)
        return {}


def record_auto_captions(root: str | Path, written: dict[str, str]) -> None:
    """Add ``written`` (relative path → caption) to the folder's record of machine-written captions."""
    p = Path(root) / ".moas" / AUTO_CAPTIONS
    record = read_auto_captions(root) | written
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, json.dumps({"version": 1, "captions": record}, indent=1, sort_keys=True).encode())


def auto_captioned(dataset) -> set[int]:
    """Dataset indices whose caption is still exactly the one ``moas caption`` wrote."""
    auto = read_auto_captions(dataset.root)
    if not auto:
        return set()
    caps = dataset.captions()
    return {i for i, p in enumerate(dataset.paths) if auto.get(rel_path(p, dataset.root)) == caps[i]}


def cache_paths(root: Path, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """The cache file next to the data, and the fallback for a folder that cannot be written."""
    folder_id = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    fallback = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "moas"
    return root / ".moas" / CACHE_NAME, fallback / f"tag_model-{folder_id}.safetensors"


def _key(items: list[tuple[str, int, str]], settings: dict) -> str:
    blob = json.dumps({"version": VERSION, "settings": settings, "items": sorted(items)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _save(path: Path, tagger: TrainedTagger, key: str, rels: list[str]) -> None:
    split = {"train": [rels[i] for i in tagger.train_idx], "heldout": [rels[i] for i in tagger.heldout_idx]}
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "key": key,
        "model_args": json.dumps({"n_tags": tagger.model.n_tags, "widths": list(tagger.model.widths)}),
        "vocab": json.dumps(tagger.vocab.tags),
        "split": json.dumps(split),
        "metrics": json.dumps(tagger.metrics),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tagger.model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=meta))


def _load(path: Path, key: str, index_of: dict[str, int]) -> TrainedTagger | None:
    """The cached tagger at ``path`` if it is readable and made for ``key``; None (logged) otherwise."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("key") != key:
                log.info("Tag model %s was made for other images or settings.", path)
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        model = TagModel(**json.loads(meta["model_args"]))
        model.load_state_dict(tensors)
        split = json.loads(meta["split"])
        train_idx = [index_of[r] for r in split["train"]]
        heldout_idx = [index_of[r] for r in split["heldout"]]
        vocab = TagVocab(json.loads(meta["vocab"]))
        metrics = json.loads(meta["metrics"])
        float(metrics["heldout"]["f1"])  # what the caller reports: checked here, where failure means retrain
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        log.warning("Tag model file %s is unreadable (%s); retraining.", path, str(exc)[:200])
        return None
    return TrainedTagger(model.eval(), vocab, train_idx, heldout_idx, metrics, trained=False, path=path)


def dataset_images(dataset, indices: Sequence[int], size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 (n, 3, size, size) of the dataset's images ``indices``, downsized one by one to save memory."""
    if not indices:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return torch.cat([resize_images(dataset[i]["pixels"], size) for i in indices])


def load_or_train_tagger(
    dataset,
    seed: int = 0,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    *,
    epochs: int | None = None,
    max_steps: int = DEFAULT_STEPS,
) -> TrainedTagger:
    """The folder's tag model: loaded from its cache when the folder and settings are unchanged, else
    trained on the captioned images of ``dataset`` (a validated ArtDataset) and saved; indices in the
    result are dataset indices. Raises DataError when the captions cannot train a tagger."""
    root = Path(dataset.root)
    captions = dataset.captions()
    auto = auto_captioned(dataset)
    use = [i for i, c in enumerate(captions) if caption_tags(c) and i not in auto]
    caps = [captions[i] for i in use]
    check_trainable(len(use), len(TagVocab.from_captions(caps)), str(root))
    rels = [rel_path(dataset.paths[i], root) for i in use]
    items = [(r, dataset.paths[i].stat().st_size, captions[i]) for r, i in zip(rels, use, strict=True)]
    # Everything else about training is fixed by VERSION: changing a default means bumping it.
    settings = {"seed": seed, "epochs": epochs, "max_steps": max_steps, "input": INPUT_SIZE}
    key = _key(items, settings)
    index_of = dict(zip(rels, use, strict=True))
    for path in cache_paths(root, cache_dir):
        tagger = _load(path, key, index_of)
        if tagger is not None:
            log.info(
                "Tag model loaded from %s (held-out micro F1 %.3f); the captioned images are unchanged.",
                path,
                tagger.metrics["heldout"]["f1"],
            )
            return tagger
    images = dataset_images(dataset, use)  # (n, 3, 64, 64)
    tagger = train_tag_model(images, caps, seed, epochs, max_steps, progress=progress)
    tagger.path = _save_somewhere(root, cache_dir, tagger, key, rels)
    tagger.train_idx = [use[j] for j in tagger.train_idx]
    tagger.heldout_idx = [use[j] for j in tagger.heldout_idx]
    m = tagger.metrics
    log.info(
        "Tag model trained on %d captioned images (%d tags), %d steps in %.0f s; held-out micro F1 %.3f on %d "
        "images; saved to %s.",
        m["n_train"],
        m["n_tags"],
        m["steps"],
        m["seconds"],
        m["heldout"]["f1"],
        m["n_heldout"],
        tagger.path,
    )
    return tagger


def _save_somewhere(
    root: Path, cache_dir: str | Path | None, tagger: TrainedTagger, key: str, rels: list[str]
) -> Path | None:
    """Save next to the data, else in the fallback folder (logged); None when neither can be written."""
    primary, fallback = cache_paths(root, cache_dir)
    try:
        _save(primary, tagger, key, rels)
        return primary
    except OSError as exc:
        log.info(
            "Cannot write %s (%s); keeping the tag model in %s instead.",
            primary,
            exc.strerror or exc,
            fallback,
        )
    try:
        _save(fallback, tagger, key, rels)
        return fallback
    except OSError as exc:
        log.warning("Cannot save the tag model anywhere (%s); it will be trained again next time.", exc)
        return None
