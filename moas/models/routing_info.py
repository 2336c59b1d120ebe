"""Reading per-tag routing: which experts a prompt's tags go to, and how much routing follows tag categories.

``describe_tag_routing`` is the per-tag part of ``moas generate --explain``. ``mutual_information``
measures, over many tags, how much knowing a tag's keyword category (``moas.models.tag_prior``; ``other``
for a tag in no category) tells about the expert it is routed to most (argmax), in bits:

    I(C; X) = Σ_{c,x} p(c,x) · log2( p(c,x) / (p(c) p(x)) )

0 means routing ignores the categories (e.g. uniform routing, or the same expert for every tag); the most it
can be is min(H(C), H(X)). ``tag_choices`` collects the (category, chosen expert) pairs from a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moas.models.tag_prior import caption_categories, tag_category
from moas.text.encoder import split_tags


def describe_tag_routing(tags: list[str], weights: torch.Tensor, names: tuple[str, ...], top: int = 3) -> str:
    """One line per tag: its category and its ``top`` experts with weights. ``weights``: [G,E] of one prompt."""
    lines = []
    w = weights.float().cpu()
    for g, tag in enumerate(tags[: w.shape[0]]):
        vals, idx = w[g].topk(min(top, w.shape[1]))
        best = ", ".join(f"{names[i]} {v:.3f}" for v, i in zip(vals.tolist(), idx.tolist(), strict=True))
        lines.append(f"  {tag:<24} [{tag_category(tag)}] → {best}")
    return "\n".join(lines)


def mutual_information(categories: torch.Tensor, experts: torch.Tensor) -> float:
    """I(category; expert) in bits from paired integer labels [N] (empirical joint distribution)."""
    if categories.numel() == 0:
        return 0.0
    c, x = categories.long().flatten(), experts.long().flatten()
    _, ci = torch.unique(c, return_inverse=True)
    _, xi = torch.unique(x, return_inverse=True)
    joint = torch.zeros(int(ci.max()) + 1, int(xi.max()) + 1, dtype=torch.float64)
    joint.index_put_((ci, xi), torch.ones_like(ci, dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pc, px = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / (pc * px)[nz]).log()).sum() / math.log(2))


def entropy_bits(labels: torch.Tensor) -> float:
    """H of the empirical distribution of integer labels [N], in bits."""
    if labels.numel() == 0:
        return 0.0
    _, counts = torch.unique(labels.long().flatten(), return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum())


@torch.no_grad()
def tag_choices(
    condition: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    captions: list[str],
    batch: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(category [N], chosen expert [N], routing rows [N,E]) of every real tag of ``captions``.

    ``condition`` is a generator's ``condition`` (built with tag routing); ``encode`` turns captions into
    its text inputs (``Pipeline.encode`` or ``caption_inputs``). The null prompt's placeholder tag is left
    out: it is no tag of the caption."""
    cats, rows = [], []
    for i in range(0, len(captions), batch):
        part = captions[i : i + batch]
        w = condition(encode(part))["tag_routing"].float().cpu()  # (b, G, E)
        for b, caption in enumerate(part):
            n = len(split_tags(caption))
            cats.extend(caption_categories(caption))
            rows.append(w[b, :n])
    routing = torch.cat(rows) if rows else torch.empty(0, 0)
    choice = routing.argmax(-1) if len(cats) else torch.empty(0, dtype=torch.long)
    return torch.tensor(cats, dtype=torch.long), choice, routing
