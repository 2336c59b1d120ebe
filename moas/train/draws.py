"""Everything random in one optimizer step, drawn at its start for all of its images.

Drawing per step rather than per micro-batch means a smaller micro-batch (after an out-of-memory error)
gets exactly the same numbers for every image; the order of draws is fixed because checkpoints pin it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
