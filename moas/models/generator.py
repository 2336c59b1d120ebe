"""MoasGenerator: the trainable text-to-image network = conditioning brain + U-Net.

``forward(x_t, t, text)`` takes the text encoding as a dict of tensors (``tokens``, ``mask``, ``tags``,
``tag_mask``, optionally ``language``, ``augment`` — the image-augmentation parameters of a training batch,
never given at sampling — and inputs added by other stages) so batches stay plain dicts; the
constructor arguments are saved with the weights so the network can be rebuilt from a model file alone.

``forward`` returns a :class:`Prediction`: the U-Net's prediction and the brain's auxiliary loss (load
balance, compression) of the same pass, so a caller never reads a side channel.

``brain`` (the ``[brain]`` config section) selects the conditioning: ``conditioning = "moas"`` installs
the full brain (``moas.models.brain``) on the ConditioningEncoder's DataFlow; ``"text"`` — or a model file
saved before the brain existed, whose arguments have no ``brain`` — is the text-only model. Arguments of
files from earlier releases go through :func:`moas.models.upgrade.upgrade_model_args` first.

Specialisation (opt-in ``brain`` switches): with ``tag_routing`` the text may carry ``tag_category``
[B,G] (``moas.text.inputs.caption_inputs`` adds it; absent, every tag counts as uncategorised); with
``aux_targets`` a training batch carries ``aux_image`` [B,3,H,W] and ``aux_mask`` [B] (``moas.train.inputs``),
which sampling never passes. Models built without a switch drop its inputs, so they compute what they
always did.

Panels: ``text`` may carry ``panel_images`` [B,K,3,H,W] + ``panel_mask`` [B,K] (the previous panels,
nearest first); they reach the ``panel_memory`` stage and the MoE's memory expert. Absent, they are fed
as ``None`` and cost nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from typing import Any, NamedTuple

import torch
from torch import nn

from moas.config import BrainConfig, ModelConfig, TextConfig
from moas.models.brain import BrainArgs, install_brain
from moas.models.conditioning import ConditioningEncoder
from moas.models.style_token import DesignStyleSupportSystem
from moas.models.tag_prior import OTHER_INDEX
from moas.models.unet import DiffusionModel

TEXT_KEYS = ("tokens", "mask", "tags", "tag_mask")
STYLE_OUTPUTS = ["extra_context", "extra_context_mask"]
CPU_PLACED = ("compression",)  # the original keeps these on the CPU to save VRAM


class Prediction(NamedTuple):
    """What one forward pass gives: the prediction and the brain's auxiliary loss (0 when it has none)."""

    pred: torch.Tensor  # (B, 3, H, W) v or ε
    aux_loss: torch.Tensor  # () load balance (+ compression reconstruction), weighted


class MoasGenerator(nn.Module):
    def __init__(
        self,
        resolution: int,
        model: dict[str, Any],
        text: dict[str, Any],
        style_dim: int = 0,
        brain: dict[str, Any] | None = None,
        augment_dim: int = 0,
    ) -> None:
        super().__init__()
        m, tx = ModelConfig(**model), TextConfig(**text)
        bc = BrainConfig(**brain) if brain is not None else BrainConfig(conditioning="text")
        self.init_args = {"resolution": resolution, "model": asdict(m), "text": asdict(tx)}
        if style_dim:  # the optional style token (moas.models.style_token)
            self.init_args["style_dim"] = style_dim
        if brain is not None:
            self.init_args["brain"] = asdict(bc)
        if augment_dim:  # trained with non-leaky image augmentation (moas.data.augment)
            self.init_args["augment_dim"] = augment_dim
        self.resolution = resolution
        self.conditioning = bc.conditioning
        self.placement = bc.placement
        self.brain = ConditioningEncoder(m.conditioning_layers, tx.use_tags, tx.use_tokens)
        self.brain_extras: nn.ModuleDict | None = None
        if bc.conditioning == "moas":
            names = {f.name for f in dataclasses.fields(BrainArgs)}
            self.brain_extras = install_brain(
                self.brain, BrainArgs(**{k: v for k, v in asdict(bc).items() if k in names})
            )
            # The spare GNN versions are not in the graph: frozen, so DDP does not wait for their gradients.
            self.brain_extras.requires_grad_(False)
        self.unet = DiffusionModel(
            resolution=resolution,
            block_channels=m.block_channels,
            cross_attention=m.cross_attention,
            layers_per_block=m.layers_per_block,
            attention_head_dim=m.attention_head_dim,
            cross_attention_dim=m.cross_attention_dim,
            norm_num_groups=m.norm_num_groups,
            patch_size=m.patch_size,
            legacy_head_count=m.legacy_head_count,
            augment_dim=augment_dim,
        )
        self.style_dim = style_dim
        if style_dim:
            self.brain.flow.register_module(
                "style", DesignStyleSupportSystem(style_dim), ["style", "style_mask"], STYLE_OUTPUTS
            )
        self.panel_memory = bc.conditioning == "moas" and bc.panel_memory
        self.tag_routing = bc.conditioning == "moas" and bc.tag_routing
        self.aux_targets = bc.conditioning == "moas" and bc.aux_targets > 0

    def stage(self, name: str) -> nn.Module | None:
        """A registered brain module (``moe``, ``gnn``, ``emotion``, …), or None if it is not registered."""
        return self.brain.flow.get_module(name) if name in self.brain.flow else None

    def place(self, device: torch.device) -> MoasGenerator:
        """Move to ``device``; with the original placement, CPU_PLACED modules stay on the CPU under CUDA."""
        self.to(device)
        if self.placement == "original" and device.type == "cuda":
            for name in CPU_PLACED:
                mod = self.stage(name)
                if mod is not None:
                    mod.to("cpu")
        return self

    def condition(self, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Inputs other than the text streams pass through to the DataFlow untouched (unused ones are ignored).
        extra = {k: v for k, v in text.items() if k not in TEXT_KEYS and k != "augment"}
        b, dev = text["tokens"].shape[0], text["tokens"].device
        if self.conditioning == "moas" and "language" not in extra:
            extra["language"] = torch.zeros(b, dtype=torch.long, device=dev)  # English
        if self.style_dim:
            extra.setdefault("style", torch.zeros(b, self.style_dim, device=dev))  # (B, S); absent = no style
            extra.setdefault("style_mask", torch.zeros(b, dtype=torch.bool, device=dev))  # (B,)
        if self.panel_memory:  # absent panels: None flows through and the memory expert skips memory
            extra.setdefault("panel_images", None)
            extra.setdefault("panel_mask", None)
        else:
            extra.pop("panel_images", None)
            extra.pop("panel_mask", None)
        self._specialisation_inputs(extra, text["tag_mask"])
        return self.brain(**{k: text[k] for k in TEXT_KEYS}, **extra)

    def _specialisation_inputs(self, extra: dict, tag_mask: torch.Tensor) -> None:
        """Default (or drop) the inputs of the opt-in tag routing and expert target heads, in place."""
        if self.tag_routing:  # absent categories: every tag is "other" (no prior bias)
            extra.setdefault("tag_category", torch.full_like(tag_mask, OTHER_INDEX, dtype=torch.long))
        else:
            extra.pop("tag_category", None)
        if self.aux_targets:  # absent at sampling: the heads are skipped
            extra.setdefault("aux_image", None)
            extra.setdefault("aux_mask", None)
        else:
            extra.pop("aux_image", None)
            extra.pop("aux_mask", None)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> Prediction:
        cond = self.condition(text)
        pooled = cond["pooled"].to(x_t.dtype)
        pred = self.unet(x_t, t, cond["context"], cond["context_mask"], pooled, text.get("augment"))
        return Prediction(pred, cond["aux_loss"])
