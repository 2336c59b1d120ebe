"""Training of the cascade's super-resolution stage (:class:`~moas.models.sr_diffusion.SuperResDiffusion`).

The stage trains beside the generator in the same run, one step after every ``sr.every`` generator steps
(or alone with ``moas train --stage sr``), a :class:`~moas.train.trained_net.TrainedNet` with its own
optimizer, EMA, GradScaler and random stream. Its
objective is the run's :class:`~moas.diffusion.objective.DiffusionObjective` over its own noise schedule
(``sr.prediction_type``, ``sr.noise_shift``).

A step's images are those of its step count in the stage's index stream (``moas.train.side_batches``:
loaded ahead in worker processes from the high-resolution cache entries); everything else is drawn from
the stage's own ``torch.Generator`` (checkpointed) on the main thread: where each crop sits, the
timesteps, the noise and the conditioning-noise levels. A resumed run continues with the very same crops.

**The stage alone** (``train.stage = "sr"``, ``moas train --stage sr``) is a run of the same loop
(``moas.train.loop``) in which the generator is frozen: it and the enhancer are the base model's
(``--init_from``, else the model at ``--save_path``), only read, and written back unchanged beside the
trained stage. ``moas.train.builders.stage_config`` turns a run's config into the stage's: the base model's resolution,
checkpoints in ``<checkpoint_dir>/sr``, no sample grids or folder evaluation of the frozen generator.
An epoch is one pass of ``sr.batch_size`` crops over the training images.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from typing import Any

import torch

from moas.config_sections import SRConfig
from moas.data.dataset import ArtDataset, to_model_range
from moas.diffusion.objective import DiffusionObjective
from moas.diffusion.schedule import NoiseSchedule, make_scheduler
from moas.diffusion.sr_condition import crop_offsets, sr_inputs, tag_vector, take_crops
from moas.models.sr_diffusion import SuperResDiffusion
from moas.text import TEXT_WIDTH
from moas.text.bank import TextBank
from moas.train.side_batches import SideBatches
from moas.train.trained_net import (
    EMA,
    StateKeys,
    TrainedNet,
    adamw,
    autocast_factory,
    grad_scaler,
    wide_float,
)

log = logging.getLogger(__name__)

# The stage's parts in its checkpoint dict (``sr`` of a run's checkpoint, or a ``--stage sr`` checkpoint).
SR_KEYS = StateKeys(
    module="model", optimizer="optimizer", scaler="scaler", ema="ema", rng="rng", steps="steps"
)


def sr_objective(cfg: SRConfig) -> DiffusionObjective:
    """The stage's objective: its own prediction target and (resolution-shifted) schedule."""
    scheduler = make_scheduler(cfg.prediction_type, shift=cfg.noise_shift)
    return DiffusionObjective(NoiseSchedule(scheduler, cfg.prediction_type, cfg.min_snr_gamma))


def stage_steps_per_epoch(cfg: SRConfig, n_images: int) -> int:
    return max(1, math.ceil(n_images / cfg.batch_size))


def build_sr_model(cfg: SRConfig) -> SuperResDiffusion:
    return SuperResDiffusion(
        cfg.block_channels, cfg.attention, cfg.layers_per_block, cfg.patch_size, TEXT_WIDTH, cfg.scale
    )


class SRStageTraining:
    def __init__(
        self,
        cfg: SRConfig,
        hr: ArtDataset,
        bank: TextBank,
        device: torch.device,
        seed: int,
        amp_dtype: torch.dtype | None = None,
        max_grad_norm: float = 1.0,
        loader_workers: int = 0,  # processes that load its images ahead (0: on the main thread)
    ) -> None:
        self.cfg, self.hr, self.bank, self.device = cfg, hr, bank, device
        # Not pinned: the crops are cut on the CPU, and only they travel to the device.
        self.images = SideBatches(hr, cfg.batch_size, seed, "sr", loader_workers)
        model = build_sr_model(cfg).to(device)
        opt = adamw(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.net = TrainedNet(
            "super-resolution",
            model,
            opt,
            grad_scaler(device, amp_dtype),
            SR_KEYS,
            max_grad_norm=max_grad_norm,
            ema=EMA(model, cfg.ema_decay),
            gen=torch.Generator().manual_seed(seed + 29),
        )
        self._autocast = autocast_factory(device, amp_dtype) or nullcontext
        self.objective = sr_objective(cfg)
        n = sum(p.numel() for p in self.model.parameters())
        log.info(
            "Super-resolution stage: %.2fM parameters, x%d, %d px crops of %d px images, %s.",
            n / 1e6,
            cfg.scale,
            cfg.crop,
            hr.resolution,
            cfg.prediction_type,
        )

    def batch(self) -> dict[str, torch.Tensor]:
        """The next step's crops, their captions' tag vector and every random draw of the step."""
        g, cfg = self.net.gen, self.cfg
        items = self.images.batch(self.net.steps)
        images = [to_model_range(px) for px in items["pixels"]]  # (3, H, W) each
        offsets = crop_offsets([tuple(im.shape[-2:]) for im in images], cfg.crop, g)
        x0 = take_crops(images, offsets, cfg.crop)  # (B, 3, crop, crop)
        text = self.bank.batch(list(items["caption"]), "cpu")
        b = x0.shape[0]
        return {
            "x0": x0,
            "text": tag_vector(text["tags"], text["tag_mask"]),  # (B, D)
            "t": torch.randint(self.objective.num_timesteps, (b,), generator=g),
            "noise": torch.randn(x0.shape, generator=g),
            "level": torch.rand(b, generator=g) * cfg.cond_noise_max,
            "cond_noise": torch.randn(x0.shape, generator=g),
            "offsets": torch.tensor(offsets),
        }

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = self.device
        x0 = batch["x0"].to(dev)
        level = batch["level"].to(dev)
        low = sr_inputs(x0, self.cfg.scale, level, batch["cond_noise"].to(dev))
        cond = {"low": low, "level": level, "text": batch["text"].to(dev)}
        out = self.objective(self.model, x0, cond, batch["t"].to(dev), batch["noise"].to(dev), self._autocast)
        return out.loss

    @property
    def model(self) -> SuperResDiffusion:
        return self.net.module

    @property
    def ema(self) -> EMA:
        return self.net.ema

    @property
    def steps(self) -> int:
        return self.net.steps

    def step(self) -> dict[str, float]:
        """One optimizer step of the stage; its TensorBoard scalars (none when the step was skipped). After an
        out-of-memory error the same batch is redone in more chunks (``TrainedNet.chunked``)."""
        net = self.net
        net.module.train()
        batch = self.batch()
        n = batch["x0"].shape[0]
        total, ok = net.chunked(lambda k: self._backward(batch, k), n, self.device)
        read = net.apply_reporting(ok, {"sr/loss": total})  # the step's one host read
        if read is None:
            return {}
        # Finite whenever the step was taken (the guard skips a non-finite norm); a device tensor, read
        # later, when the guard decides on the device.
        read["sr/grad_norm"] = net.read[0]
        return read

    def _backward(self, batch: dict[str, torch.Tensor], chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage's gradients over ``chunks`` pieces of the batch, each weighted by its share; the loss and
        whether it was finite, on the device (a non-finite loss is backpropagated and its step skipped by
        the guard, which reads both with the gradient norm)."""
        self.net.opt.zero_grad(set_to_none=True)
        n = batch["x0"].shape[0]
        pieces = [batch]
        if chunks > 1:
            split = {k: v.tensor_split(chunks) for k, v in batch.items()}
            pieces = [{k: v[i] for k, v in split.items()} for i in range(chunks)]
        wide = wide_float(self.device)
        total = torch.zeros((), dtype=wide, device=self.device)
        ok = torch.ones((), dtype=torch.bool, device=self.device)
        for piece in pieces:
            loss = self.loss(piece)
            ok = ok & torch.isfinite(loss)
            w = piece["x0"].shape[0] / n
            self.net.backward(loss if chunks == 1 else loss * w)
            total = total + loss.detach().to(wide) * w
        return total, ok

    def start_loading(self) -> None:
        """Start loading the images of the stage's next steps (its worker processes start now)."""
        self.images.start(self.net.steps)

    def close(self) -> None:
        """Stop the processes that load the stage's images."""
        self.images.close()

    def state_dict(self) -> dict[str, Any]:
        return {**self.net.state_dict(), "args": self.model.init_args}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore from a checkpoint; a checkpoint without the stage (an older run) leaves it fresh (logged)."""
        if not state:
            log.info("The checkpoint has no super-resolution stage; it starts from initialisation.")
            return
        self.net.load_state_dict(state)
