"""Training of everything beyond the diffusion loss: domain losses, the discriminator and the enhancer.

``SideNetworks`` is built once by the training loop and called at three points of a step:
  ``generator_loss``    the domain losses (``AdvancedLossFunctions``) on the step's predicted x0, each sample
                        weighted by ᾱ_t^p so low-noise timesteps (where x0 is meaningful) count most;
                        plus the GAN term once the discriminator is past its warm-up;
  ``after_step``        one AnimeStyleDiscriminator step (its own AdamW) and one QualityEnhancer step on
                        (degraded → original) pairs built from the training images at ``scale``× the base
                        resolution, alternating ×2 and ×4 pairs. The images of enhancer step ``s`` are step
                        ``s`` of its index stream, loaded ahead in worker processes
                        (``moas.train.side_batches``); they are degraded on the training device with draws
                        from the enhancer's own generator.
Each returns per-term values for TensorBoard (``loss/<term>``, ``disc/*``, ``enhance/*``). ``state_dict``
holds everything needed to resume; the model file takes the trained ``enhancer`` for generation.

Each side network is a :class:`~moas.train.trained_net.TrainedNet` (its optimizer, GradScaler, guarded step
and checkpoint state). Under mixed precision their forward passes run in autocast. Their steps come after
the generator's has been applied, so an out-of-memory error in one is recovered on the spot: the step is
redone on the same batch in more chunks (``TrainedNet.chunked``), and the chunk count is kept for the
following steps.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch

from moas.config_sections import EnhanceConfig, LossConfig
from moas.data.dataset import ArtDataset, to_model_range
from moas.diffusion.schedule import NoiseSchedule
from moas.losses import AdvancedLossFunctions, discriminator_loss
from moas.models.discriminator import AnimeStyleDiscriminator
from moas.models.enhance import QualityEnhancer
from moas.train.degrade import degrade
from moas.train.side_batches import SideBatches, hr_dataset
from moas.train.trained_net import (
    StateKeys,
    TrainedNet,
    adamw,
    autocast_factory,
    discriminator_optimizer,
    grad_scaler,
    wide_float,
)

log = logging.getLogger(__name__)

TERM_FIELDS = ("pixel", "ssim", "line_art", "color", "style", "anatomy", "perceptual", "gan")
ENHANCER_WEIGHTS = {
    "pixel": 1.0,
    "ssim": 0.2,
    "line_art": 0.2,
    "color": 0.05,
    "style": 0.0,
    "anatomy": 0.0,
    "gan": 0.0,
}
# Where each side network sits in the checkpoint's ``domain`` dict, as since the first release.
DISC_KEYS = StateKeys(
    module="disc", optimizer="disc_opt", scaler="disc_scaler", steps="disc_steps", chunks="disc_chunks"
)
ENH_KEYS = StateKeys(
    module="enhancer",
    optimizer="enh_opt",
    scaler="enh_scaler",
    steps="enh_steps",
    chunks="enh_chunks",
    rng="hr_rng",
)


class SideNetworks:
    def __init__(
        self,
        losses: LossConfig,
        enhance: EnhanceConfig,
        dataset: ArtDataset,
        device: torch.device,
        *,
        generator_lr: float,
        weight_decay: float,
        term_clamp: float,
        max_grad_norm: float,
        seed: int,
        amp_dtype: torch.dtype | None = None,  # the autocast dtype (None = fp32)
        loader_workers: int = 0,  # processes that load the enhancer's images ahead (0: on the main thread)
        ram_cache_bytes: int = 0,  # the enhancer's images kept in RAM (moas.data.dataset.ArtDataset)
    ) -> None:
        lc, ec = losses, enhance
        self.device = device
        mixed_precision = amp_dtype is not None
        self._autocast = autocast_factory(device, amp_dtype) or nullcontext
        self.domain_weight, self.low_noise_power = lc.domain_weight, lc.low_noise_power
        self.disc_warmup_steps = lc.disc_warmup_steps
        self.enhance_every, self.enhance_batch = ec.every, ec.batch_size
        weights = {k: getattr(lc, k) for k in TERM_FIELDS}
        weights["gan"] = lc.gan if lc.adversarial else 0.0
        self.stack = None
        if lc.domain:
            self.stack = AdvancedLossFunctions(
                weights, mixed_precision, lc.mse_weight, lc.l1_weight, lc.vgg_weights, term_clamp
            ).to(device)
            log.info("Domain losses on the predicted x0: %s.", ", ".join(self.stack.active))
        self.disc_net: TrainedNet | None = None
        if lc.adversarial:
            disc = AnimeStyleDiscriminator(lc.disc_base_channels).to(device)
            opt = discriminator_optimizer(disc, generator_lr, weight_decay)
            scaler = grad_scaler(device, amp_dtype)
            self.disc_net = TrainedNet(
                "discriminator", disc, opt, scaler, DISC_KEYS, max_grad_norm=max_grad_norm
            )
        self.enh_net: TrainedNet | None = None
        if ec.train:
            enhancer = QualityEnhancer(ec.width, ec.sr_channels, ec.sr_blocks).to(device)
            opt = adamw(enhancer.parameters(), lr=ec.lr, betas=(0.9, 0.999), amsgrad=True)
            self.enh_net = TrainedNet(
                "enhancer",
                enhancer,
                opt,
                grad_scaler(device, amp_dtype),
                ENH_KEYS,
                max_grad_norm=1.0,
                gen=torch.Generator().manual_seed(seed + 17),
            )
            enh_weights = dict(ENHANCER_WEIGHTS, perceptual=lc.perceptual)
            self.enh_stack = AdvancedLossFunctions(
                enh_weights, False, vgg_weights=lc.vgg_weights, term_clamp=term_clamp
            ).to(device)
            self.hr = hr_dataset(dataset, dataset.resolution * ec.scale, ram_cache_bytes)
            batch = min(self.enhance_batch, len(self.hr))
            self.hr_batches = SideBatches(self.hr, batch, seed, "enhancer", loader_workers, device)
            n = sum(p.numel() for p in enhancer.parameters())
            log.info(
                "QualityEnhancer: %.2fM parameters, trained on %d px pairs.", n / 1e6, self.hr.resolution
            )

    @property
    def disc(self) -> AnimeStyleDiscriminator | None:
        return self.disc_net.module if self.disc_net is not None else None

    @property
    def enhancer(self) -> QualityEnhancer | None:
        """The trained enhancer (it goes into the model file), or None when it does not train."""
        return self.enh_net.module if self.enh_net is not None else None

    # --- generator side -------------------------------------------------------------------------------
    def disc_active(self, global_step: int) -> bool:
        return self.disc is not None and global_step >= self.disc_warmup_steps

    @property
    def uses_x0(self) -> bool:
        """True when the generator's step needs its predicted x0 here (domain losses or the critic)."""
        return self.stack is not None or self.disc_net is not None

    def generator_loss(
        self,
        x0: torch.Tensor,
        x0_pred: torch.Tensor | None,
        t: torch.Tensor,
        schedule: NoiseSchedule,
        global_step: int,
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """(weighted domain loss or None, scalars for TensorBoard) of the predicted x0 (float32, with its
        graph) against the images ``x0``."""
        if self.stack is None or x0_pred is None:
            return None, {}
        w = schedule.alpha.to(t.device)[t] ** (2 * self.low_noise_power)  # ᾱ_t^p, (B,)
        fake_prob = None
        if self.disc_active(global_step):
            self.disc.eval()  # the critic judges without updating its BatchNorm statistics or dropping out
            fake_prob = self.disc(x0_pred)
        res = self.stack(x0_pred, x0, sample_weight=w, fake_prob=fake_prob)
        scalars = res.scalars("loss/")
        scalars["loss/domain"] = float(res.total.detach())
        return self.domain_weight * res.total, scalars

    # --- discriminator and enhancer steps -------------------------------------------------------------
    def after_step(
        self, x0: torch.Tensor, x0_pred: torch.Tensor | None, global_step: int
    ) -> dict[str, float]:
        """Discriminator and enhancer updates after a generator optimizer step; TensorBoard scalars."""
        out: dict[str, float] = {}
        if self.disc_active(global_step) and x0_pred is not None:
            out.update(self.discriminator_step(x0, x0_pred))
        if self.enhancer is not None and global_step % self.enhance_every == 0:
            out.update(self.enhancer_step())
        return out

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        net = self.disc_net
        net.module.train()
        logs = net.chunked(lambda k: self._discriminator_backward(real, fake, k), real.shape[0], self.device)
        return net.apply_reporting(torch.isfinite(logs["disc/loss"]), logs) or {}

    def _discriminator_backward(
        self, real: torch.Tensor, fake: torch.Tensor, chunks: int
    ) -> dict[str, float]:
        """The critic's loss and gradients, over ``chunks`` pieces of the batch (each weighted by its share,
        so the gradients are the whole batch's); its TensorBoard scalars."""
        net = self.disc_net
        net.opt.zero_grad(set_to_none=True)
        logs: dict[str, torch.Tensor] = {}  # on the device: read with the step's finite check
        wide = wide_float(real.device)
        for r, f in zip(real.tensor_split(chunks), fake.tensor_split(chunks), strict=True):
            with self._autocast():
                real_p, fake_p = self.disc(r.float()), self.disc(f.float().clamp(-1, 1))  # (b, 1) each
            real_p, fake_p = real_p.float(), fake_p.float()
            w = r.shape[0] / real.shape[0]
            loss = discriminator_loss(real_p, fake_p) * w
            net.backward(loss)
            scalars = {
                "loss": loss.detach().to(wide),
                "real": real_p.detach().mean().to(wide) * w,
                "fake": fake_p.detach().mean().to(wide) * w,
            }
            _accumulate(logs, {f"disc/{k}": v for k, v in scalars.items()})
        return logs

    def _hr_batch(self) -> torch.Tensor:
        """The images of the enhancer's next step, on the device (uint8 travels: a quarter of the bytes)."""
        pixels = self.hr_batches.batch(self.enh_net.steps)["pixels"]  # (B, 3, H, W) uint8
        return to_model_range(pixels.to(self.device, non_blocking=True))

    def enhancer_loss(
        self, hr: torch.Tensor, lr: torch.Tensor, factor: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """SR-only and full-mode outputs of ``lr`` (``hr`` degraded ``factor``×), both scored against ``hr``."""
        size = tuple(hr.shape[-2:])
        with self._autocast():
            up = self.enhancer.upscale(lr, size, "full")  # (B, 3, H, W)
            full = self.enhancer.refine(up, "full")
        up, full = up.float(), full.float()
        r_sr, r_full = self.enh_stack(up, hr), self.enh_stack(full, hr)
        wide = wide_float(hr.device)  # the scalars stay on the device: read with the step's finite check
        scalars = {f"enhance/{k}": v.detach().to(wide) for k, v in r_full.terms.items()}
        scalars[f"enhance/sr_x{factor}"] = r_sr.total.detach().to(wide)
        scalars["enhance/loss"] = r_full.total.detach().to(wide)
        return r_sr.total + r_full.total, scalars

    def enhancer_step(self) -> dict[str, float]:
        net = self.enh_net
        net.module.train()
        factor = 2 if net.steps % 2 == 0 else 4  # alternate the ×2 and ×4 heads
        hr = self._hr_batch()  # (B, 3, H, W)
        # Degraded once for the whole batch, so a redo in chunks trains on the same pairs.
        lr = degrade(hr, factor, net.gen)  # (B, 3, H/f, W/f)
        done = net.chunked(lambda k: self._enhancer_backward(hr, lr, factor, k), hr.shape[0], self.device)
        if done is None:
            net.apply(False)
            return {}
        scalars, ok = done
        return net.apply_reporting(ok, scalars) or {}

    def _enhancer_backward(
        self, hr: torch.Tensor, lr: torch.Tensor, factor: int, chunks: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """The enhancer's gradients over ``chunks`` pieces of the batch, each weighted by its share; its
        TensorBoard scalars and whether every loss was finite (both on the device: a non-finite loss is
        backpropagated and its step skipped by the guard), or None when a loss has no gradient."""
        self.enh_net.opt.zero_grad(set_to_none=True)
        scalars: dict[str, torch.Tensor] = {}
        ok = torch.ones((), dtype=torch.bool, device=hr.device)
        for h, low in zip(hr.tensor_split(chunks), lr.tensor_split(chunks), strict=True):
            loss, terms = self.enhancer_loss(h, low, factor)
            if not loss.requires_grad:
                return None
            ok = ok & torch.isfinite(loss)
            w = h.shape[0] / hr.shape[0]
            self.enh_net.backward(loss * w)
            _accumulate(scalars, {k: v * w for k, v in terms.items()})
        return scalars, ok

    def start_loading(self) -> None:
        """Start loading the images of the enhancer's next steps (its worker processes start now)."""
        if self.enh_net is not None:
            self.hr_batches.start(self.enh_net.steps)

    def close(self) -> None:
        """Stop the processes that load the enhancer's images."""
        if self.enh_net is not None:
            self.hr_batches.close()

    # --- persistence ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {DISC_KEYS.steps: 0, ENH_KEYS.steps: 0}
        for net in (self.disc_net, self.enh_net):
            if net is not None:
                state.update(net.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore from a checkpoint; a network missing from an older checkpoint starts fresh (logged)."""
        state = state or {}
        for net in (self.disc_net, self.enh_net):
            if net is None:
                continue
            if net.keys.module not in state:
                log.info("The checkpoint has no %s weights; it starts from initialisation.", net.name)
                continue
            net.load_state_dict(state)


def _accumulate(total: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Add ``values`` into ``total`` (the first chunk's values are taken as they are)."""
    for k, v in values.items():
        total[k] = total[k] + v if k in total else v
