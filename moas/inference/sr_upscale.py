"""The cascade's diffusion super-resolution at generation: base images in, ``scale``× larger images out.

The low-resolution image is upsampled and given the fixed, small conditioning-noise level the stage saw in
training (``sr.cond_noise``, :mod:`moas.diffusion.sr_condition`); the prompt enters as its mean tag
embedding. The sampler is built from the stage's own training schedule (prediction type and resolution
shift), and every random draw comes from the image's seed, so an image depends on its seed only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moas.config_sections import SRConfig
from moas.data.dataset import to_model_range, to_uint8
from moas.device import autocast_or_not, inference_dtype
from moas.diffusion.sampling import initial_noise, make_sampler, sample
from moas.diffusion.schedule import make_scheduler
from moas.diffusion.sr_condition import noisy_condition, tag_vector, upsample
from moas.errors import CheckpointError, MoasError
from moas.inference.model_file import ModelFile
from moas.models.sr_diffusion import SuperResDiffusion

TARGET_NAMES = {"sample": "x-prediction", "v_prediction": "v-prediction", "epsilon": "eps-prediction"}
# Seed offsets of the stage's streams: different from the base image's noise for the same seed.
COND_NOISE_SEED, SAMPLE_SEED = 7_919, 104_729


def saved_sr_config(saved: dict | None) -> SRConfig:
    """The model config's ``[sr]`` section (sampling settings of the stage), filled with today's defaults."""
    names = set(SRConfig.__dataclass_fields__)
    try:
        return SRConfig(**{k: v for k, v in (saved or {}).items() if k in names})
    except MoasError:
        return SRConfig()


class DiffusionUpscaler:
    def __init__(self, stage: SuperResDiffusion, cfg: SRConfig, device: torch.device) -> None:
        self.stage = stage.eval().to(device)
        self.cfg, self.device, self.scale = cfg, device, stage.scale
        self.chunk = 4  # images upscaled at once
        self.amp = inference_dtype(device)  # bf16 on a GPU where it is native, else None (float32)
        self.train_config = dict(make_scheduler(cfg.prediction_type, shift=cfg.noise_shift).config)

    def describe(self, steps: int | None = None) -> str:
        """For the PNG parameters: what this stage did."""
        c = self.cfg
        target = TARGET_NAMES.get(c.prediction_type, c.prediction_type)
        return (
            f"diffusion x{self.scale} ({target}, {steps or c.steps} steps {c.sampler}, "
            f"conditioning noise {c.cond_noise:g})"
        )

    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        text: dict[str, torch.Tensor],
        seeds: list[int],
        steps: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """uint8 (B, 3, h, w) and the prompts' text inputs (``tags``, ``tag_mask``) -> uint8 (B, 3, s·h, s·w).

        Upscaled ``chunk`` images at a time: at 512 px a whole batch's activations would not fit a 12 GB
        card, and an image depends on its seed only, so the chunks give the same images."""
        h, w = images.shape[-2:]
        size = (h * self.scale, w * self.scale)
        if size[0] % self.stage.unit or size[1] % self.stage.unit:
            raise MoasError(
                f"The super-resolution stage needs image sides that are multiples of {self.stage.unit}; "
                f"{size[1]}x{size[0]} is not."
            )
        out = []
        for i in range(0, len(seeds), self.chunk):
            part = slice(i, i + self.chunk)
            tags = {k: text[k][part] for k in ("tags", "tag_mask")}
            out.append(self._upscale(images[part], tags, seeds[part], size, steps, progress))
        return torch.cat(out, 0)

    def _upscale(
        self,
        images: torch.Tensor,
        text: dict[str, torch.Tensor],
        seeds: list[int],
        size: tuple[int, int],
        steps: int | None,
        progress: bool,
    ) -> torch.Tensor:
        dev = self.device
        up = upsample(to_model_range(images).to(dev), size)  # (B, 3, H, W)
        level = torch.full((len(seeds),), self.cfg.cond_noise, device=dev)
        cnoise = initial_noise([s + COND_NOISE_SEED for s in seeds], (3, *size), dev)
        cond = {
            "low": noisy_condition(up, level, cnoise),
            "level": level,
            "text": tag_vector(text["tags"], text["tag_mask"]).to(dev),
        }

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast_or_not(dev, self.amp):
                return self.stage(x, t, cond)[0].float()

        x = sample(
            denoise,
            make_sampler(self.cfg.sampler, self.train_config),
            [s + SAMPLE_SEED for s in seeds],
            (3, *size),
            steps or self.cfg.steps,
            1.0,
            dev,
            progress=progress,
        )
        return to_uint8(x).cpu()


def load_sr_upscaler(mf: ModelFile, path: str | Path, device: torch.device) -> DiffusionUpscaler | None:
    """The model file's super-resolution stage, or None when it has none."""
    if mf.sr_args is None:
        return None
    try:
        stage = SuperResDiffusion(**mf.sr_args)
        stage.load_state_dict(mf.sr_weights)
    except (KeyError, TypeError, RuntimeError, ValueError):
        raise CheckpointError(
            f"{path} has super-resolution weights that do not fit this version of moas."
        ) from None
    return DiffusionUpscaler(stage, saved_sr_config(mf.config.get("sr")), device)
