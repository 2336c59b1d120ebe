"""``moas caption``: tag the folder's uncaptioned images with the tag model trained on its captioned ones.

Each image with neither a ``.txt`` nor a ``.caption`` file gets ``<stem>.txt``: the tags whose probability
is at least ``threshold``, most probable first, at most ``max_tags``. An existing caption file is never
overwritten, and an image with no tag above the threshold gets no file (an empty caption would look like a
caption). Files are written atomically. The captions written are recorded in ``.moas/auto_captions.json``
so the tag model never trains on its own guesses (see :mod:`moas.eval.tagger`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from moas.data.captions import CAPTION_SUFFIXES
from moas.data.dataset import ArtDataset
from moas.errors import ConfigError, DataError
from moas.eval.tagger import (
    caption_tags,
    dataset_images,
    load_or_train_tagger,
    record_auto_captions,
    rel_path,
)
from moas.io import atomic_write_bytes

log = logging.getLogger(__name__)

CHUNK = 256  # images predicted at once


def caption_coverage(captions: Sequence[str]) -> tuple[int, int]:
    """(images whose caption has at least one tag, all images)."""
    return sum(1 for c in captions if caption_tags(c)), len(captions)


def _has_caption_file(image: Path) -> bool:
    return any(image.with_suffix(s).exists() for s in CAPTION_SUFFIXES)


def _write_caption(image: Path, text: str) -> bool:
    """Write ``<stem>.txt`` unless a caption file appeared meanwhile; a user-facing error if it cannot."""
    if _has_caption_file(image):
        return False
    try:
        atomic_write_bytes(image.with_suffix(".txt"), (text + "\n").encode("utf-8"))
    except OSError as exc:
        raise DataError(f"Cannot write caption files next to {image} ({exc.strerror or exc}).") from None
    return True


def _record(root: Path, written: dict[str, str]) -> None:
    try:
        record_auto_captions(root, written)
    except OSError as exc:  # the captions are written; only the tag model's exclusion of them is lost
        log.warning(
            "Could not record the written captions in %s/.moas (%s); the tag model will train on them.",
            root,
            exc.strerror or exc,
        )


def caption_folder(
    data_dir: str | Path,
    seed: int = 0,
    threshold: float = 0.5,
    progress: bool = True,
    max_tags: int = 20,
    cache_dir: str | Path | None = None,
    epochs: int | None = None,
) -> dict:
    """Write tag captions for the uncaptioned images of ``data_dir``; returns the counts (module docstring)."""
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold must be between 0 and 1 (exclusive), got {threshold}.")
    if max_tags < 1:
        raise ConfigError(f"--max_tags must be at least 1, got {max_tags}.")
    root = Path(data_dir)
    ds = ArtDataset(root, resolution=64, cache_dir=None)  # nothing written but the captions and the tag model
    ds.validate(progress=progress)
    captioned_before, total = caption_coverage(ds.captions())
    todo = [i for i, p in enumerate(ds.paths) if not _has_caption_file(p)]
    counts = {"images": total, "captioned_before": captioned_before, "threshold": threshold}
    if not todo:  # nothing to write: no reason to spend minutes on a tag model
        return {**counts, "written": 0, "skipped_captioned": total, "no_tag": 0, "files": [], "tagger": None}
    tagger = load_or_train_tagger(ds, seed=seed, progress=progress, cache_dir=cache_dir, epochs=epochs)
    written: dict[str, str] = {}
    files, no_tag, raced = [], 0, 0
    try:
        for k in range(0, len(todo), CHUNK):
            part = todo[k : k + CHUNK]
            probs = tagger.predict(dataset_images(ds, part))  # (c, T)
            for i, p in zip(part, probs, strict=True):
                order = p.argsort(descending=True).tolist()
                tags = [tagger.vocab.tags[t] for t in order if p[t] >= threshold][:max_tags]
                if not tags:
                    no_tag += 1
                    continue
                text = ", ".join(tags)
                if not _write_caption(ds.paths[i], text):
                    raced += 1
                    continue
                written[rel_path(ds.paths[i], root)] = text
                files.append(str(ds.paths[i].with_suffix(".txt")))
    finally:
        if written:  # what was written stays recorded even when a later write fails
            _record(root, written)
    return {
        **counts,
        "written": len(written),
        "skipped_captioned": total - len(todo) + raced,
        "no_tag": no_tag,
        "files": files,
        "tagger": {
            "path": str(tagger.path) if tagger.path else None,
            "trained": tagger.trained,
            "heldout_f1": tagger.metrics["heldout"]["f1"],
        },
    }


def describe(result: dict) -> str:
    """What ``moas caption`` did, in a sentence or two."""
    t = result["tagger"]
    if t is None:
        return f"all {result['images']} images already have a caption file; nothing was written."
    how = "trained now" if t["trained"] else "reused"
    files = "caption file" if result["written"] == 1 else "caption files"
    return (
        f"wrote {result['written']} {files} for uncaptioned images; {result['skipped_captioned']} images "
        f"already had a caption file and were left as they were; {result['no_tag']} had no tag at or above "
        f"{result['threshold']} and stay uncaptioned.\n"
        f"tag model ({how}, held-out micro F1 {t['heldout_f1']:.3f}): {t['path'] or 'not saved'}"
    )
