"""Training the folder tag model: its own seed-fixed split, the loop, and the trained result.

:func:`train_tag_model` fits :class:`~moas.eval.tag_model.TagModel` (BCE with logits, AdamW, one-cycle
learning rate, random shifts of a few pixels as the only augmentation: no flips, since tags may say left or
right, and no colour changes, since tags name colours) on a seed-fixed 85 % of the captioned images and
measures it on the other 15 % (at least one image), for a budget of optimizer steps (never a wall-clock
limit: its quality, and every folder number measured with it, must not depend on how busy the machine
was). :mod:`moas.eval.tagger` caches the result per folder.

On a machine whose cores other processes keep busy, training uses fewer threads (:func:`free_threads`);
that can change float rounding, so two trainings of one folder may then differ slightly; the cache keeps
the first.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moas.errors import DataError
from moas.eval.tag_model import (
    INPUT_SIZE,
    TagModel,
    TagVocab,
    caption_tags,
    micro_prf,
    prepare,
    resize_images,
    tag_metrics,
    to_unit_range,
)

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.15
MIN_CAPTIONED = 10  # fewer captioned images cannot both train and check a tagger
MIN_TAGS = 2
MAX_SHIFT = 4  # pixels of random translation at 64 px
DEFAULT_STEPS = 600  # the step budget (monitor.tagger_steps): see bench/RESULTS.md, "The folder's tag model"
# A tag model whose held-out micro F1 is under this, or not MIN_MARGIN above always predicting the folder's
# commonest tags, measures little on that folder: the folder score built on it marks itself unreliable and
# best-step selection does without it. On the demo set the tag model reached 0.72 and the folder score
# followed the independent demo table; on a folder of real painted portraits it reached 0.07 (noise).
MIN_RELIABLE_F1 = 0.3
MIN_MARGIN = 0.1


@dataclass
class TrainedTagger:
    """The tag model with its vocabulary, its own train / held-out split (indices into the images it was
    given, or dataset indices from :func:`moas.eval.tagger.load_or_train_tagger`) and its held-out metrics."""

    model: TagModel
    vocab: TagVocab
    train_idx: list[int]
    heldout_idx: list[int]
    metrics: dict = field(default_factory=dict)
    trained: bool = True  # False when loaded from the cache
    path: Path | None = None  # the cache file, when there is one
    # Measurements of dataset images kept by moas.eval.folder_eval, so an evaluation at every checkpoint
    # reads the training images once per run; the weights never change after training, so they stay valid.
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @torch.no_grad()
    def _run(
        self, images: torch.Tensor | Sequence[torch.Tensor], fn, width: int, batch_size: int
    ) -> torch.Tensor:
        self.model.eval()
        out = [fn(prepare(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, width)

    def predict(
        self, images_uint8: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 256
    ) -> torch.Tensor:
        """Tag probabilities (B, T) of uint8 images of any size."""
        return self._run(images_uint8, lambda x: torch.sigmoid(self.model(x)), len(self.vocab), batch_size)

    def features(
        self, images_uint8: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 256
    ) -> torch.Tensor:
        """Pooled features (B, F) of uint8 images of any size (KID, memorisation)."""
        return self._run(images_uint8, self.model.features, self.model.feature_dim, batch_size)


def split_indices(n: int, seed: int, fraction: float = HELDOUT_FRACTION) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: ``max(1, round(fraction·n))`` held out when n >= MIN_CAPTIONED, else none."""
    k = max(1, round(fraction * n)) if n >= MIN_CAPTIONED else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104_729)).tolist()
    return sorted(order[k:]), sorted(order[:k])


def auto_epochs(n_train: int) -> int:
    """About 60k image presentations, between 15 and 60 epochs: ~2 min for 3,000 images on 2 CPU cores."""
    return int(min(60, max(15, round(60_000 / max(1, n_train)))))


def check_trainable(n_captioned: int, n_tags: int, where: str = "the given set") -> None:
    if n_captioned < MIN_CAPTIONED:
        raise DataError(
            f"Only {n_captioned} images in {where} have captions, and the tag model needs at least "
            f"{MIN_CAPTIONED}; add .txt captions (comma-separated tags) to more images."
        )
    if n_tags < MIN_TAGS:
        raise DataError(
            f"The captions in {where} have {n_tags} tag(s) used on 3 or more images, and the tag model needs "
            f"at least {MIN_TAGS}; caption the images with consistent comma-separated tags."
        )


def _shifted(batch: torch.Tensor, rng: torch.Generator, s: int = MAX_SHIFT) -> torch.Tensor:
    """Each image moved by up to ``s`` pixels each way (edge pixels repeated): (B, 3, H, W) → same."""
    h, w = batch.shape[-2:]
    padded = F.pad(batch, (s, s, s, s), mode="replicate")
    offs = torch.randint(0, 2 * s + 1, (batch.shape[0], 2), generator=rng).tolist()
    return torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offs)])


def free_threads(threads: int, sample_s: float = 0.25) -> int:
    """Torch threads to train with: ``threads``, less the cores other processes keep busy (at least 1).

    Two OpenMP threads on two cores that another process also uses spin-wait for each other and a step
    takes many times longer; training a generator follows the free cores all along (moas.train.threads),
    the tag model's few minutes of training measure them once, while this process is idle."""
    if threads <= 1:
        return threads

    def busy_seconds() -> float:
        t = psutil.cpu_times()  # guest time is also counted in user time; iowait is idle
        return (
            sum(t)
            - getattr(t, "guest", 0.0)
            - getattr(t, "guest_nice", 0.0)
            - t.idle
            - getattr(t, "iowait", 0.0)
        )

    before, start = busy_seconds(), time.monotonic()
    time.sleep(sample_s)
    others = (busy_seconds() - before) / max(time.monotonic() - start, 1e-6)  # cores busy meanwhile
    return max(1, min(threads, int((os.cpu_count() or 1) - others + 0.5)))


def _fit(
    model: TagModel,
    x: torch.Tensor,
    y: torch.Tensor,
    train_idx: list[int],
    steps: int,
    bs: int,
    lr: float,
    seed: int,
    progress: bool,
) -> int:
    """``steps`` optimizer steps on uint8 64 px images ``x`` (N, 3, 64, 64) and labels ``y`` (N, T), in
    shuffled passes over ``train_idx``; returns the steps taken."""
    n = len(train_idx)
    rng = torch.Generator().manual_seed(seed + 1)  # batch order and shifts
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=steps, pct_start=0.15, cycle_momentum=False
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(free_threads(threads))
    step = 0
    model.train()
    bar = tqdm(total=steps, desc="tag model", unit="step", disable=not progress)
    try:
        while step < steps:
            order = torch.tensor(train_idx)[torch.randperm(n, generator=rng)]
            for k in range(0, n, bs):
                idx = order[k : k + bs]
                xb = _shifted(to_unit_range(x[idx]), rng)  # (b, 3, 64, 64)
                loss = F.binary_cross_entropy_with_logits(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                if step == steps:
                    break
    finally:
        bar.close()
        torch.set_num_threads(threads)  # the caller's setting
    return step


def train_tag_model(
    images: torch.Tensor | Sequence[torch.Tensor],
    captions: Sequence[str],
    seed: int = 0,
    epochs: int | None = None,
    max_steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    lr: float = 2e-3,
    min_count: int = 3,
    max_tags: int = 256,
    progress: bool = True,
) -> TrainedTagger:
    """Train a tag model on uint8 images (N, 3, H, W) (or a list) and their captions; see the module docstring.

    ``epochs`` passes over the training split (None: :func:`auto_epochs`), at most ``max_steps`` optimizer
    steps: a budget in steps, not seconds, so the result does not depend on how busy the machine is.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    vocab = TagVocab.from_captions(captions, min_count, max_tags)
    check_trainable(sum(1 for c in captions if caption_tags(c)), len(vocab))
    x = resize_images(images, INPUT_SIZE)  # (N, 3, 64, 64) uint8: a quarter of the float memory
    y = vocab.encode_many(captions)  # (N, T)
    train_idx, heldout_idx = split_indices(len(captions), seed)
    n = len(train_idx)
    epochs = epochs or auto_epochs(n)
    bs = min(batch_size, max(16, n // 8))  # small folders still get several steps per epoch
    steps = min(epochs * math.ceil(n / bs), max_steps)
    with torch.random.fork_rng(devices=[]):  # seed the init without moving the caller's random stream
        torch.manual_seed(seed)
        model = TagModel(len(vocab))
    t0 = time.perf_counter()
    step = _fit(model, x, y, train_idx, steps, bs, lr, seed, progress)
    tagger = TrainedTagger(model.eval(), vocab, train_idx, heldout_idx)
    probs = tagger.predict(x[heldout_idx]) if heldout_idx else torch.zeros(0, len(vocab))
    tagger.metrics = {
        "heldout": tag_metrics(probs, y[heldout_idx]),
        "baseline_f1": constant_baseline_f1(y[train_idx], y[heldout_idx]),
        "n_train": n,
        "n_heldout": len(heldout_idx),
        "n_tags": len(vocab),
        "epochs": round(step * bs / max(n, 1), 1),
        "steps": step,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return tagger


def constant_baseline_f1(train_labels: torch.Tensor, heldout_labels: torch.Tensor) -> float | None:
    """The held-out micro F1 of the best constant answer: every image gets the tags above some frequency in
    the training split (the threshold that scores best, so the bar is set high). A tag model has to beat it
    to have seen anything in the pictures."""
    if len(heldout_labels) == 0 or len(train_labels) == 0:
        return None
    prior = train_labels.float().mean(0).expand(len(heldout_labels), -1)  # (h, T)
    best = max(micro_prf(prior, heldout_labels, float(t))["f1"] for t in prior[0].unique())
    return round(best, 4)


def reliability(metrics: dict) -> tuple[bool, str]:
    """Whether a tag model is good enough to judge images on its folder, and why, in words."""
    f1 = float(metrics["heldout"]["f1"])
    base = metrics.get("baseline_f1")
    than = f" (always answering the commonest tags: {base:.3f})" if base is not None else ""
    if f1 < MIN_RELIABLE_F1:
        return False, f"its tag model reached held-out F1 {f1:.3f}{than}, under {MIN_RELIABLE_F1}"
    if base is not None and f1 < base + MIN_MARGIN:
        return (
            False,
            f"its tag model's held-out F1 {f1:.3f} is not {MIN_MARGIN} above {base:.3f} (the commonest tags)",
        )
    return True, f"its tag model reached held-out F1 {f1:.3f}{than}"
