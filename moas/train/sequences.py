"""Panel sequences in training: the memory expert's inputs and the temporal-consistency loss.

Called for every micro-batch (``moas.train.inputs`` for the inputs, ``moas.train.loop`` for the loss):

``inputs``  the batch's previous panels (``panels`` [B,K,3,H,W], nearest first) as the generator's
            ``panel_images`` / ``panel_mask``. Condition dropout drops the memory together with the
            text (a null-prompt row must also be memory-free, so the unconditional branch of guidance
            — which gets no memory at generation — is what the model learned); rows whose caption the
            caption augmentation emptied lose their memory too.
``loss``    ``TemporalConsistencyLoss`` between the predicted x0 and the previous panel's real image,
            for rows that kept their memory, each weighted by ᾱ_t^p like the domain losses (x0 is only
            meaningful at low noise); scalars ``loss/temporal`` and ``loss/temporal_<term>``.
A batch without sequences gets no inputs and no loss: it costs nothing. Under DDP a model with panel
memory must still touch those parameters every step (``ddp_touch``), or the reducer waits for gradients
that never come.
"""

from __future__ import annotations

import torch
from torch import nn

from moas.diffusion.schedule import NoiseSchedule
from moas.losses.temporal import TemporalConsistencyLoss


def memory_keep(drop: torch.Tensor, captions: list[str], originals: list[str]) -> torch.Tensor:
    """(B,) True where the row keeps its panel memory: not condition-dropped, caption not emptied."""
    emptied = torch.tensor([c == "" and o != "" for c, o in zip(captions, originals, strict=True)])
    return ~drop.cpu() & ~emptied


def panel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters used only when panel memory is present (PanelMemory, the memory expert's attention, the
    MemoryBridge)."""
    stage = model.stage("panel_memory") if hasattr(model, "stage") else None
    if stage is None:
        return []
    experts = model.stage("moe").experts
    bridge = model.stage("memory_bridge")
    return [
        *stage.parameters(),
        *(bridge.parameters() if bridge is not None else ()),
        experts.mem_in_w,
        experts.mem_in_b,
        *experts.mem_out.parameters(),
        experts.memory_gate,
    ]


class PanelTraining:
    def __init__(
        self,
        enabled: bool,
        weight: float,
        character_weight: float,
        scene_weight: float,
        low_noise_power: float,
        term_clamp: float,
    ) -> None:
        self.enabled = enabled  # the model has panel memory and the data has sequences
        self.power = low_noise_power
        self.weight = weight
        self.loss_fn = TemporalConsistencyLoss(character_weight, scene_weight, term_clamp)

    def inputs(self, batch: dict, keep: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """``panel_images`` uint8 [B,K,3,H,W] + ``panel_mask`` [B,K], or {} when no row has a panel."""
        if not self.enabled or "panels" not in batch:
            return {}
        mask = batch["panel_mask"] & keep[:, None]  # (B, K)
        if not mask.any():
            return {}
        return {"panel_images": batch["panels"].to(device), "panel_mask": mask.to(device)}

    def uses_x0(self, panel_in: dict) -> bool:
        """True when this micro-batch's temporal loss needs the predicted x0."""
        return bool(panel_in) and self.weight > 0

    def loss(
        self,
        panel_in: dict[str, torch.Tensor],
        x0_pred: torch.Tensor | None,
        t: torch.Tensor,
        schedule: NoiseSchedule,
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """(weighted temporal loss or None, TensorBoard scalars) for the rows that have a previous panel;
        ``x0_pred``: the step's predicted x0 (B, 3, H, W), float32 with its graph."""
        if not self.uses_x0(panel_in) or x0_pred is None:
            return None, {}
        has_prev = panel_in["panel_mask"][:, 0]  # (B,) slot 0 = the panel just before
        prev = panel_in["panel_images"][:, 0].float().div(127.5).sub(1.0)  # (B, 3, H, W) in [-1, 1]
        w = schedule.alpha.to(t.device)[t] ** (2 * self.power) * has_prev.to(x0_pred.dtype)  # (B,)
        res = self.loss_fn(x0_pred, prev, sample_weight=w)
        scalars = {f"loss/temporal_{k}": float(v) for k, v in res.terms.items()}
        scalars["loss/temporal"] = float(res.total.detach())
        return self.weight * res.total, scalars


def ddp_touch(model: nn.Module, panel_in: dict) -> torch.Tensor | float:
    """0 × the panel-only parameters when this step used no memory, so DDP sees them every step."""
    if panel_in:
        return 0.0
    params = panel_parameters(model)
    return sum(p.sum() for p in params) * 0.0 if params else 0.0
