"""The tag model's parts: caption tags, the folder's tag vocabulary, the CNN, image preparation and metrics.

The tag model is a small multi-label classifier trained from scratch (no pretrained weights anywhere) on the
user's own captioned images; :mod:`moas.eval.tagger` trains and caches it. It stands in for a pretrained
tagger or CLIP, which moas never downloads: its predictions measure prompt adherence and its pooled features
carry KID and the memorisation test. Numbers made with it are comparable between moas runs on the same
folder, not with published scores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 64  # the tag model's input side; every image is resized to it
WIDTHS = (32, 64, 128, 128)  # channels of the four stride-2 stages


def caption_tags(caption: str) -> list[str]:
    """Comma-separated tags: stripped, lowercased, empty ones dropped, duplicates removed (first kept)."""
    seen: dict[str, None] = {}
    for t in caption.split(","):
        tag = " ".join(t.split()).lower()
        if tag:
            seen.setdefault(tag, None)
    return list(seen)


class TagVocab:
    """The folder's frequent tags, most frequent first (ties by name), and multi-hot encoding."""

    def __init__(self, tags: Sequence[str]) -> None:
        self.tags = list(tags)
        self.index = {t: i for i, t in enumerate(self.tags)}
        if len(self.index) != len(self.tags):
            raise ValueError("tag vocabulary has duplicate tags")

    @classmethod
    def from_captions(cls, captions: Iterable[str], min_count: int = 3, max_tags: int = 256) -> TagVocab:
        counts = Counter(t for c in captions for t in caption_tags(c))
        ranked = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
        return cls(ranked[:max_tags])

    def __len__(self) -> int:
        return len(self.tags)

    def encode(self, caption: str) -> torch.Tensor:
        """Multi-hot float (T,): 1 for each of the caption's tags in the vocabulary (others are ignored)."""
        out = torch.zeros(len(self.tags))
        for t in caption_tags(caption):
            i = self.index.get(t)
            if i is not None:
                out[i] = 1.0
        return out

    def encode_many(self, captions: Sequence[str]) -> torch.Tensor:
        if not captions:
            return torch.zeros(0, len(self.tags))
        return torch.stack([self.encode(c) for c in captions])  # (N, T)


class TagModel(nn.Module):
    """Four stride-2 conv stages (3×3 conv, GroupNorm, SiLU; a second conv in the three smaller stages),
    global average pooling to a ``widths[-1]``-d feature vector, and a linear layer to one logit per tag.

    Input: float (B, 3, 64, 64) in [-1, 1] (see :func:`prepare`). Batch statistics are never used
    (GroupNorm), so training and eval mode compute the same function.
    """

    def __init__(self, n_tags: int, widths: Sequence[int] = WIDTHS) -> None:
        super().__init__()
        self.n_tags, self.widths = n_tags, tuple(widths)
        layers: list[nn.Module] = []
        c_in = 3
        for k, c in enumerate(self.widths):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            if k > 0:  # the 32×32 stage stays single: a second conv there would double the cost
                layers += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, n_tags)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))  # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, T) logits


def resize_images(images: torch.Tensor | Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) — or a list of (3, H, W) of any sizes — to uint8 (B, 3, size, size).

    Antialiased bilinear, so downscaling averages like area interpolation; non-square images are squashed
    rather than cropped, so no tagged content is cut away.
    """
    if isinstance(images, torch.Tensor):
        groups = [images] if images.ndim == 4 else [images[None]]
    else:
        groups = [im[None] if im.ndim == 3 else im for im in images]
    out = []
    for g in groups:
        if tuple(g.shape[-2:]) == (size, size):
            out.append(g.to(torch.uint8))
            continue
        x = F.interpolate(g.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, 3, size, size, dtype=torch.uint8)


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div(127.5).sub(1.0)  # [0, 255] → [-1, 1]


def prepare(images_uint8: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Any uint8 (B, 3, H, W) (or list of (3, H, W)) → float (B, 3, 64, 64) in [-1, 1], the model's input."""
    return to_unit_range(resize_images(images_uint8, INPUT_SIZE))


# ---- metrics ------------------------------------------------------------------------------------------


def micro_prf(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict:
    """Micro-averaged precision, recall and F1 of ``probs >= threshold`` against multi-hot ``labels``.

    Every (image, tag) decision counts once. With no predicted (or no true) tags the undefined ratio is 0,
    and the counts are reported so that case can be told apart.
    """
    pred = probs >= threshold
    truth = labels > 0.5
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def average_precision(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Non-interpolated AP of one tag: the mean of the precision at the rank of each positive."""
    order = scores.argsort(descending=True)
    hits = truth[order].float()
    precision_at = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


def mean_average_precision(probs: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Macro mean of the per-tag AP over the tags with at least one positive; None when no tag has one."""
    aps = [
        average_precision(probs[:, t], labels[:, t] > 0.5)
        for t in range(labels.shape[1])
        if labels[:, t].any()
    ]
    return sum(aps) / len(aps) if aps else None


def tag_metrics(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict:
    """Micro P/R/F1 at ``threshold`` and mAP, rounded for the report; ``n_images`` is the row count."""
    m = micro_prf(probs, labels, threshold)
    mean_ap = mean_average_precision(probs, labels)
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
    out["map"] = round(mean_ap, 4) if mean_ap is not None else None
    out["threshold"] = threshold
    out["n_images"] = int(labels.shape[0])
    return out
