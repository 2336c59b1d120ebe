"""The generator's inputs from captions: one function for training, validation and generation.

A caption becomes its token and tag embeddings with their masks (from the text bank in training and
validation, from the encoder at generation) plus the detected language the story expert reads. Inputs
that do not come from the caption (style token, previous panels) are added by the caller.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moas.text.language import language_batch


class TextSource(Protocol):
    """``TextBank`` (captions encoded once, for training) or ``TextEncoder`` (any prompt)."""

    def batch(
        self, captions: list[str], device: torch.device | str = "cpu", cache: bool = True
    ) -> dict[str, torch.Tensor]: ...


def caption_inputs(
    source: TextSource, captions: list[str], device: torch.device | str, cache: bool = True
) -> dict[str, torch.Tensor]:
    """``tokens`` [B,L,768], ``mask`` [B,L], ``tags`` [B,G,768], ``tag_mask`` [B,G], ``language`` [B].

    ``cache=False`` keeps captions the bank has not seen out of it (per-epoch augmented captions)."""
    text = source.batch(captions, device, cache=cache)
    text.update(language_batch(captions, device))
    return text
