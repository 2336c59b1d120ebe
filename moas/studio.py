"""MultiverseOriginStudioAI: the original's top-level object — the whole system built from a config and
placed on its devices the original's way — for ``moas inspect``, which prints it. Training builds its parts
through ``moas.train.builders`` and generation through ``moas.inference.pipeline``; this is the view of
them together.

It builds the generator (conditioning brain on its DataFlow + U-Net), exposes the VisionEncoder for image
inputs (the one inside the generator's PanelMemory, trained on panel sequences and fed the previous panels
by ``moas generate --panels``; a stand-alone one when the generator has no panel memory) and the
continuous-learning controller, and places them as the original does:

* GPU (when CUDA is used): the brain — EnhancedGNN v1–v4, EnhancedMoE, EmotionalArtisticUnderstanding,
  DeepUnderstandingSystem, PanelMemory, the structure/art/camera/story experts — the U-Net;
* CPU: AdvancedCompressionSystem (when enabled). The trained QualityEnhancer is also kept on the CPU by
  default (``enhance.device``; it is loaded by ``moas.inference.pipeline``, not built here). The style stage
  (DesignStyleSupportSystem) sits with the generator on its device.

``placement = "single"`` puts everything on one device. On a CPU-only machine everything is on the CPU.
Modules on different devices exchange tensors explicitly (each CPU-placed module moves its inputs in and
its outputs back).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moas.models.generator import CPU_PLACED, MoasGenerator
from moas.models.vision import VisionEncoder
from moas.train.adaptive import AdvancedContinuousLearning


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class MultiverseOriginStudioAI:
    def __init__(
        self, generator: MoasGenerator, device: torch.device | str = "cpu", continuous_rate: float = 0.5
    ) -> None:
        self.device = torch.device(device)
        self.generator = generator
        # The VisionEncoder the generator trains (inside PanelMemory, on panel sequences) is the one used for
        # image inputs; a generator without panel memory gets a stand-alone, untrained one.
        memory = generator.stage("panel_memory")
        self.vision_shared = memory is not None
        self.vision_encoder = memory.vision if memory is not None else VisionEncoder()
        self.continuous_learning = AdvancedContinuousLearning(continuous_rate)
        # The cascade's super-resolution stage: its own network, listed only (generation loads it itself).
        self.sr_stage: tuple[str, int] | None = None
        self.place(self.device)

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu") -> MultiverseOriginStudioAI:
        """Everything a training run with ``cfg`` (a ``MoasConfig``) would build, untrained."""
        from moas.train.builders import generator_args
        from moas.train.sr_stage import build_sr_model

        system = cls(MoasGenerator(**generator_args(cfg)), device, cfg.brain.continuous_rate)
        if cfg.sr.train:
            system.sr_stage = (_sr_label(cfg.sr.scale, cfg.sr.prediction_type), count(build_sr_model(cfg.sr)))
        return system

    @classmethod
    def from_file(cls, path: str | Path, device: torch.device | str = "cpu") -> MultiverseOriginStudioAI:
        from moas.inference.model_file import load_generator, read_model_file
        from moas.inference.sr_upscale import saved_sr_config
        from moas.models.sr_diffusion import SuperResDiffusion

        mf = read_model_file(path)
        system = cls(load_generator(mf, path), device)
        if mf.sr_args is not None:
            sr = saved_sr_config((mf.config or {}).get("sr"))
            n = count(SuperResDiffusion(**mf.sr_args))
            system.sr_stage = (_sr_label(mf.sr_args.get("scale", sr.scale), sr.prediction_type), n)
        return system

    def place(self, device: torch.device) -> None:
        self.generator.place(device)
        self.vision_encoder.to(device)

    def placement(self) -> dict[str, str]:
        """Component → device it lives on."""
        out = {}
        for name in self.generator.brain.flow.modules_in_order():
            mod = self.generator.stage(name)
            p = next(mod.parameters(), None)
            out[name] = str(p.device) if p is not None else "-"
        out["unet"] = str(next(self.generator.unet.parameters()).device)
        out["vision_encoder"] = str(next(self.vision_encoder.parameters()).device)
        return out

    @property
    def vision_label(self) -> str:
        return (
            "vision_encoder (inside panel_memory)"
            if self.vision_shared
            else "vision_encoder (inference only)"
        )

    def parameter_counts(self) -> list[tuple[str, int]]:
        """(component, parameters) for every brain module in DataFlow order, the spare GNNs, U-Net, vision."""
        g = self.generator
        rows = [(name, count(g.stage(name))) for name in g.brain.flow.modules_in_order()]
        if g.brain_extras is not None:
            rows += [(f"{k} (spare, for ablation)", count(m)) for k, m in g.brain_extras.items()]
        rows.append(("unet (DiffusionModel)", count(g.unet)))
        rows.append(("generator total", count(g)))
        rows.append((self.vision_label, count(self.vision_encoder)))
        if self.sr_stage is not None:
            rows.append(self.sr_stage)
        return rows

    def describe(self, graph: bool = False) -> str:
        g = self.generator
        place = self.placement()
        lines = [f"MultiverseOriginStudioAI — conditioning: {g.conditioning}, placement: {g.placement}", ""]
        width = max(len(n) for n, _ in self.parameter_counts())
        lines.append(f"{'component':<{width}}  {'parameters':>12}  device")
        for name, n in self.parameter_counts():
            key = name.split(" ")[0]
            lines.append(f"{name:<{width}}  {n:>12,}  {place.get(key, '')}")
        if graph:
            lines += ["", g.brain.flow.describe()]
        cpu = [n for n in CPU_PLACED if n in g.brain.flow]
        if cpu:
            lines += ["", f"CPU-placed under CUDA with the original placement: {', '.join(cpu)}"]
        return "\n".join(lines)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """VisionEncoder on caller-provided images [B,3,H,W] in [-1,1] (inference only, never in workers)."""
        self.vision_encoder.eval()
        return self.vision_encoder(images.to(self.device))


def _sr_label(scale: int, prediction_type: str) -> str:
    kind = "x-prediction" if prediction_type == "sample" else prediction_type
    return f"sr_stage (cascade, x{scale} super-resolution diffusion, {kind})"
