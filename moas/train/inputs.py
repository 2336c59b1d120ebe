"""A training micro-batch → the generator's inputs.

Captions get the per-epoch augmentation (a pure function of seed, epoch and image, so resuming repeats
it), condition dropout empties them for classifier-free guidance, and :func:`moas.text.inputs.caption_inputs`
turns them into the text tensors, as for validation and generation. The style token is hidden for
``style_dropout`` of the rows; the previous panels of a sequence go with the text (dropped together).
"""

from __future__ import annotations

import torch

from moas.data.captions import CaptionAugment
from moas.text.bank import TextBank
from moas.text.inputs import caption_inputs
from moas.train.draws import StepDraws
from moas.train.sequences import PanelTraining, memory_keep


class TrainingInputs:
    def __init__(self, bank: TextBank, augment: CaptionAugment, seed: int, panels: PanelTraining) -> None:
        self.bank, self.augment, self.seed, self.panels = bank, augment, seed, panels

    def __call__(
        self, batch: dict, draws: StepDraws, epoch: int, device: torch.device
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the generator's inputs, the panel-memory part of them — empty when no row has a panel)."""
        originals = list(batch["captions"])
        captions = [
            self.augment(c, self.seed, epoch, int(i)) for c, i in zip(originals, batch["index"], strict=True)
        ]
        captions = ["" if dropped else c for c, dropped in zip(captions, draws.drop.tolist(), strict=True)]
        cond = caption_inputs(self.bank, captions, device, cache=not self.augment.active)
        if "style" in batch:
            keep = batch["has_style"] & draws.style_keep  # (B,)
            cond.update({"style": batch["style"].to(device), "style_mask": keep.to(device)})
        keep = memory_keep(draws.drop, captions, originals)  # the memory goes with the text
        panel_in = self.panels.inputs(batch, keep, device)
        cond.update(panel_in)
        return cond, panel_in
