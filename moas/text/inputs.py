"""The generator's inputs from captions: one function for training, validation and generation.

A caption becomes its token and tag embeddings with their masks (from the text bank in training and
validation, from the encoder at generation) plus the detected language the story expert reads and each
tag's keyword category (``moas.models.tag_prior``), which per-tag routing biases toward an expert. Inputs
that do not come from the caption (style token, previous panels) are added by the caller.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moas.models.tag_prior import tag_category_batch
from moas.text.language import language_batch


class TextSource(Protocol):
    """``TextBank`` (captions encoded once, for training) or ``TextEncoder`` (any prompt)."""

    def batch(
        self, captions: list[str], device: torch.device | str = "cpu", cache: bool = True
    ) -> dict[str, torch.Tensor]: ...


def caption_inputs(
    source: TextSource, captions: list[str], device: torch.device | str, cache: bool = True
) -> dict[str, torch.Tensor]:
    """``tokens`` [B,L,768], ``mask`` [B,L], ``tags`` [B,G,768], ``tag_mask`` [B,G], ``language`` [B],
    ``tag_category`` [B,G] (long; models without tag routing ignore it).

    ``cache=False`` keeps captions the bank has not seen out of it (per-epoch augmented captions)."""
    text = source.batch(captions, device, cache=cache)
    text.update(language_batch(captions, device))
    text["tag_category"] = tag_category_batch(captions, text["tag_mask"].shape[1], device)
    return text
