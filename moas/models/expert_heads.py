"""Auxiliary domain heads: a linear head from each domain expert's state to its image target.

``brain.aux_targets`` (a weight, 0 = off) registers this stage after the MoE. In training the conditioning
carries the training image (``aux_image`` [B,3,H,W] in [-1, 1]) and ``aux_mask`` [B] (False for rows whose
caption was dropped for classifier-free guidance: an empty prompt cannot know the image). Each expert named
in ``moas.models.expert_targets.EXPERT_TARGETS`` gets ``Linear(D → K)`` from its state [B,D] to its target
[B,K]; its loss is the masked mean squared error, and the stage's ``aux_target_loss`` is the mean over the
experts (``ConditioningEncoder`` weights it with ``aux_targets`` into the generator's auxiliary loss, as it
does the MoE load balance). At sampling there is no image and the heads are skipped.

The heads start at zero (built with ``skip_init``, so they draw nothing from the random stream and a model
with the heads has the same initial weights elsewhere as one without). Per-expert losses are summed on the
device between reads (``take_means``: the mean per expert since the last read, for TensorBoard).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moas.models.expert_targets import EXPERT_TARGETS, expert_targets

log = logging.getLogger(__name__)


class ExpertTargetHeads(nn.Module):
    def __init__(self, expert_names: tuple[str, ...], dim: int) -> None:
        super().__init__()
        self.names = tuple(n for n in EXPERT_TARGETS if n in expert_names)
        self.index = {n: expert_names.index(n) for n in self.names}
        self.heads = nn.ModuleDict()
        for n in self.names:
            head = nn.utils.skip_init(nn.Linear, dim, EXPERT_TARGETS[n][1])
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            self.heads[n] = head
        # Metrics only: kept out of checkpoints so files with and without them stay alike.
        self.register_buffer("loss_sum", torch.zeros(len(self.names)), persistent=False)
        self.register_buffer("loss_count", torch.zeros(()), persistent=False)
        self._warned = False

    def predict(self, expert_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each head's prediction [B,K] from the expert states [B,E,D]."""
        return {n: self.heads[n](expert_states[:, self.index[n]]).float() for n in self.names}

    def forward(
        self,
        expert_states: torch.Tensor,
        aux_image: torch.Tensor | None = None,
        aux_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if aux_image is None:
            if self.training and torch.is_grad_enabled():
                self._warn_once()
                # 0 × the heads: DDP expects a gradient for every parameter in every training step.
                return {"aux_target_loss": sum(p.sum() for p in self.parameters()) * 0.0}
            return {"aux_target_loss": expert_states.new_zeros((), dtype=torch.float32)}
        b = expert_states.shape[0]
        mask = torch.ones(b, device=expert_states.device) if aux_mask is None else aux_mask.float()
        targets = expert_targets(aux_image, self.names)
        pred = self.predict(expert_states)
        rows = mask.sum().clamp_min(1.0)
        losses = torch.stack(
            [((pred[n] - targets[n]).pow(2).mean(1) * mask).sum() / rows for n in self.names]
        )  # (K,)
        with torch.no_grad():
            self.loss_sum += losses.detach()
            self.loss_count += 1
        return {"aux_target_loss": losses.mean()}

    @torch.no_grad()
    def take_means(self) -> dict[str, float]:
        """Mean loss per expert over the forward passes since the last call (empty when there were none)."""
        if float(self.loss_count) == 0:
            return {}
        means = (self.loss_sum / self.loss_count).tolist()
        self.loss_sum.zero_()
        self.loss_count.zero_()
        return dict(zip(self.names, means, strict=True))

    def _warn_once(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "brain.aux_targets is on but the training inputs carry no image (aux_image); the expert "
                "target heads are not trained."
            )
