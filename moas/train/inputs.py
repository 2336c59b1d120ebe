"""A training micro-batch → the generator's inputs: the step's random draws, the images, the text.

**The step's draws** (:class:`StepDraws`): everything random in one optimizer step, drawn at its start for
all of its images. Drawing per step rather than per micro-batch means a smaller micro-batch (after an
out-of-memory error) gets exactly the same numbers for every image; the order of draws is fixed because
checkpoints pin it.

**The inputs** (:class:`TrainingInputs`).
Captions get the per-epoch augmentation (a pure function of seed, epoch and image, so resuming repeats
it), condition dropout empties them for classifier-free guidance, and :func:`moas.text.inputs.caption_inputs`
turns them into the text tensors, as for validation and generation. The style token is hidden for
``style_dropout`` of the rows; the previous panels of a sequence go with the text (dropped together).

With image augmentation on (``moas.data.augment``), :meth:`TrainingInputs.images` warps each image from
the cache's larger copy, a mirrored image's caption has left and right swapped, and the generator's
inputs carry the scaled parameters as ``augment`` (B, AUG_DIM), which sampling never passes (zeros).

With ``aux_image`` (for a generator built with ``brain.aux_targets``) the inputs also carry the micro-batch's
images (what :meth:`TrainingInputs.images` returned) as ``aux_image`` (B, 3, H, W) — the expert heads'
targets are computed from them — and ``aux_mask`` (B,), False where the caption is empty (dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moas.data.augment import ImageAugment, swap_sides
from moas.data.captions import CaptionAugment
from moas.data.dataset import to_model_range
from moas.text.bank import TextBank
from moas.text.inputs import caption_inputs
from moas.train.sequences import PanelTraining, memory_keep


@dataclass
class StepDraws:
    """In the order drawn: a seed for torch's global RNG, condition dropout, style-token dropout,
    timesteps, noise."""

    seed: int
    drop: torch.Tensor  # (N,) bool: train on the null prompt
    style_keep: torch.Tensor | None  # (N,) bool; None when the data has no style tokens
    t: torch.Tensor  # (N,)
    noise: torch.Tensor  # (N, 3, H, W)

    @classmethod
    def draw(
        cls,
        gen: torch.Generator,
        n: int,
        shape: tuple[int, ...],
        num_timesteps: int,
        cond_dropout: float,
        style_dropout: float | None,
    ) -> StepDraws:
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        drop = torch.rand(n, generator=gen) < cond_dropout
        style_keep = None if style_dropout is None else torch.rand(n, generator=gen) >= style_dropout
        t = torch.randint(0, num_timesteps, (n,), generator=gen)
        return cls(seed, drop, style_keep, t, torch.randn((n, *shape), generator=gen))

    def rows(self, start: int, stop: int) -> StepDraws:
        """The draws of images ``start:stop`` of the step (one micro-batch)."""
        keep = None if self.style_keep is None else self.style_keep[start:stop]
        return StepDraws(self.seed, self.drop[start:stop], keep, self.t[start:stop], self.noise[start:stop])


class TrainingInputs:
    def __init__(
        self,
        bank: TextBank,
        augment: CaptionAugment,
        seed: int,
        panels: PanelTraining,
        image: ImageAugment | None = None,
        aux_image: bool = False,
    ) -> None:
        self.bank, self.augment, self.seed, self.panels = bank, augment, seed, panels
        self.image = image or ImageAugment()
        self.aux_image = aux_image

    def images(
        self, batch: dict, epoch: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The micro-batch's images in [-1, 1] (B, 3, H, W) and their augmentation (B, AUG_DIM) or None."""
        if not self.image.active or "pixels_hr" not in batch:
            x0, params = to_model_range(batch["pixels"]).to(device), None
        else:
            h, w = batch["pixels"].shape[-2:]
            params = self.image.draw(self.seed, epoch, batch["index"], aspect=h / w)  # (B, AUG_DIM)
            x0 = self.image.apply(batch["pixels_hr"].to(device), params, (h, w))
        return x0, params

    def __call__(
        self,
        batch: dict,
        draws: StepDraws,
        epoch: int,
        device: torch.device,
        images: torch.Tensor,
        augment: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the generator's inputs, the panel-memory part of them — empty when no row has a panel);
        ``images`` and ``augment`` are what :meth:`images` returned for this micro-batch."""
        originals = list(batch["captions"])
        if augment is not None:  # a mirrored picture's left is the caption's right
            flipped = (augment[:, 0] > 0.5).tolist()
            originals = [swap_sides(c) if f else c for c, f in zip(originals, flipped, strict=True)]
        captions = [
            self.augment(c, self.seed, epoch, int(i)) for c, i in zip(originals, batch["index"], strict=True)
        ]
        captions = ["" if dropped else c for c, dropped in zip(captions, draws.drop.tolist(), strict=True)]
        cond = caption_inputs(self.bank, captions, device, cache=not self.augment.active and augment is None)
        if augment is not None:
            cond["augment"] = self.image.conditioning(augment).to(device)
        if "style" in batch:
            keep = batch["has_style"] & draws.style_keep  # (B,)
            cond.update({"style": batch["style"].to(device), "style_mask": keep.to(device)})
        if self.aux_image:
            has_text = torch.tensor([bool(c.strip()) for c in captions], device=device)  # (B,)
            cond.update({"aux_image": images, "aux_mask": has_text})
        keep = memory_keep(draws.drop, captions, originals)  # the memory goes with the text
        panel_in = self.panels.inputs(batch, keep, device)
        cond.update(panel_in)
        return cond, panel_in
