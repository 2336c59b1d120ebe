"""The parts of a training run, built by ``moas.train.builders`` and used by the loop (``moas.train.loop``):
the objects it updates (``TrainingParts``, with their checkpoint state), its data, where it computes, and
the loop's settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moas.data.dataset import ArtDataset
from moas.inference.model_file import ModelFile
from moas.models.generator import MoasGenerator
from moas.resources import EnhancedResourceManager
from moas.text.bank import TextBank
from moas.text.encoder import TextEncoder
from moas.train.adaptive import AdaptiveTrainingSystem, AdvancedContinuousLearning
from moas.train.distributed import DistContext
from moas.train.lr_schedule import WarmupCosineRestarts
from moas.train.side_networks import SideNetworks
from moas.train.speed import CompiledForward
from moas.train.sr_stage import SRStageTraining
from moas.train.threads import ThreadGovernor
from moas.train.trained_net import EMA, StateKeys, TrainedNet

# The generator's parts at the top level of a checkpoint, as since the first release.
GENERATOR_KEYS = StateKeys(
    module="model", optimizer="optimizer", scaler="scaler", ema="ema", scaler_always=True
)


@dataclass
class TrainingParts:
    net: TrainedNet  # the generator with its optimizer, GradScaler and EMA (moas.train.trained_net)
    ddp_model: nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    sched: WarmupCosineRestarts
    adaptive: AdaptiveTrainingSystem | None  # the original's loss-curve lr rules (off by default)
    continuous: AdvancedContinuousLearning | None  # routing/expert-weight adjustment between epochs
    side: SideNetworks  # the domain losses, discriminator and enhancer (checkpoint key "domain")
    compiled: CompiledForward | None = None  # the U-Net's torch.compile'd forward, when on
    sr: SRStageTraining | None = None  # the cascade's super-resolution stage, when it trains
    # The base model when only the stage trains (``--stage sr``): the generator and enhancer are its own,
    # frozen, and neither is in the run's checkpoints.
    frozen: ModelFile | None = None

    @property
    def model(self) -> MoasGenerator:
        return self.net.module

    @property
    def ema(self) -> EMA:
        return self.net.ema

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.net.opt

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.net.scaler

    def state_dict(self) -> dict[str, Any]:
        if self.frozen is not None:
            return {}
        return {
            **self.net.state_dict(),
            "scheduler": self.sched.state_dict(),
            "adaptive": self.adaptive.state_dict() if self.adaptive else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises KeyError, RuntimeError, ValueError or TypeError when ``state`` does not fit these parts."""
        if self.frozen is not None:
            return
        self.net.load_state_dict(state)
        self.sched.load_state_dict(state["scheduler"])
        if self.adaptive is not None and "adaptive" in state:
            self.adaptive.load_state_dict(state["adaptive"])

    def start_loaders(self) -> None:
        """Start the side networks' loaders at their step counts (restored first, when the run resumes)."""
        if self.frozen is None:
            self.side.start_loading()
        if self.sr is not None:
            self.sr.start_loading()

    def close_loaders(self) -> None:
        """Stop the side networks' loader processes (the end of a run, or an error)."""
        self.side.close()
        if self.sr is not None:
            self.sr.close()

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def lrs(self) -> dict[str, float]:
        """Learning rate per parameter group (named where the group has a name)."""
        return {g.get("name", str(k)): g["lr"] for k, g in enumerate(self.opt.param_groups)}


@dataclass
class Runtime:
    """Where and how the run computes."""

    dist: DistContext
    device: torch.device
    threads: int
    resources: EnhancedResourceManager
    amp_dtype: torch.dtype | None  # autocast dtype; None = fp32
    governor: ThreadGovernor | None = None  # CPU threads that follow the free cores (moas.train.threads)


@dataclass
class TrainingData:
    encoder: TextEncoder
    dataset: ArtDataset
    val_set: ArtDataset | None
    captions: list[str]
    bank: TextBank


@dataclass
class LoopSettings:
    """The loop's settings (from ``[train]``, ``[diffusion]`` and ``[data]``)."""

    epochs: int
    max_steps: int  # 0 = no limit
    save_every: int  # epochs between checkpoints
    save_every_steps: int  # 0 = only per epoch
    sample_every: int  # epochs between sample grids (0 = none)
    max_grad_norm: float
    loss_clamp: float
    min_batch_size: int  # out-of-memory recovery stops below this micro-batch
    cond_dropout: float  # null-prompt probability
    style_dropout: float  # probability of hiding the style token
    loader_workers: int
    read_every: int = 1  # optimizer steps between host reads of the step's values (moas.train.deferred)
    stage_steps: int = 0  # steps per epoch of the super-resolution stage alone; 0: the generator trains
