"""Text → image with a trained generator: the text encoder, the sampler and classifier-free guidance.

Used by ``moas generate``, ``moas eval`` and the training run's sample grids.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from moas.config import DiffusionConfig, SampleConfig
from moas.data.dataset import to_model_range, to_uint8
from moas.device import autocast_or_not, host_work, inference_dtype
from moas.diffusion.sampling import guided, make_sampler, sample
from moas.diffusion.schedule import make_train_scheduler
from moas.errors import CheckpointError, MoasError
from moas.inference.model_file import ModelFile, load_generator, read_model_file
from moas.inference.sr_upscale import load_sr_upscaler
from moas.io import short_hash
from moas.models.enhance import QualityEnhancer
from moas.models.generator import MoasGenerator
from moas.models.gnn import EnhancedGNN
from moas.models.panel_memory import PanelMemory
from moas.resources import L3CacheManager
from moas.text.encoder import TextEncoder
from moas.text.inputs import caption_inputs

log = logging.getLogger(__name__)


def load_enhancer(mf: ModelFile, path: str | Path, device: str = "cpu") -> QualityEnhancer | None:
    """The model file's trained enhancer on ``device`` (the original runs it on the CPU), or None."""
    if mf.enhancer_args is None:
        return None
    try:
        enhancer = QualityEnhancer(**mf.enhancer_args)
        enhancer.load_state_dict(mf.enhancer_weights)
    except (KeyError, TypeError, RuntimeError):
        raise CheckpointError(f"{path} has enhancer weights that do not fit this version of moas.") from None
    dev = torch.device(device if device == "cpu" or torch.cuda.is_available() else "cpu")
    return enhancer.eval().to(dev)


def saved_sample_config(saved: dict | None) -> SampleConfig:
    """The model config's ``[sample]`` section (the generation defaults), filled with today's defaults."""
    names = {f.name for f in dataclasses.fields(SampleConfig)}
    return SampleConfig(**{k: v for k, v in (saved or {}).items() if k in names})


class Pipeline:
    def __init__(
        self,
        model: MoasGenerator,
        encoder: TextEncoder,
        diffusion: DiffusionConfig,
        device: torch.device,
        model_hash: str = "",
        sample_defaults: SampleConfig | None = None,
        enhance_mode: str = "full",
    ) -> None:
        self.model = model.eval().place(device)
        self.encoder = encoder
        self.diffusion = diffusion
        self.device = device
        self.model_hash = model_hash
        self.sample_defaults = sample_defaults or SampleConfig()  # the model config's [sample] section
        self.train_config = dict(make_train_scheduler(diffusion).config)
        self.style_db: dict | None = None  # the artist style database saved with the model
        self.style: torch.Tensor | None = None  # fingerprint used by __call__ (set_style)
        self.enhancer = None  # the trained QualityEnhancer (moas/models/enhance.py), when the file has one
        self.enhance_mode = enhance_mode
        self.amp = inference_dtype(device)  # bf16 on a GPU where it is native, else None (float32)
        self.sr = (
            None  # the super-resolution diffusion stage (moas/inference/sr_upscale.py), when the file has one
        )
        self.loss_weights: dict = {}  # the model config's [losses] (temporal metric weights for panels)
        self.model_config: dict = {}  # the training configuration saved with the model (when from a file)
        self.provenance: dict = {}  # its training data folder, seed, epoch, … (when from a file)
        # GNN outputs and the encoded previous panels are cached across sampler steps (the original's
        # L3CacheManager use at inference).
        self.l3_cache = L3CacheManager()
        self._cond_text: dict | None = None  # the text dict whose conditioning ``_cond`` holds (denoise)
        self._cond: dict = {}
        for m in self.model.modules():
            if isinstance(m, EnhancedGNN | PanelMemory):
                m.cache = self.l3_cache

    def set_style(self, name: str | None) -> None:
        """Condition on the style ``name`` from the model's style database (None: no style)."""
        from moas.data.artist_style import ArtistStyleDatabase

        if name is None:
            self.style = None
            return
        if not self.style_db or not getattr(self.model, "style_dim", 0):
            raise MoasError(
                "This model was trained without styles (set data.extract_style = true to train them)."
            )
        self.style = ArtistStyleDatabase.from_dict(self.style_db).get(name)

    @classmethod
    def from_file(
        cls, path: str | Path, device: torch.device, text_model_name: str | None = None
    ) -> Pipeline:
        """Load a model file (``.safetensors``, an earlier release's ``.pt``, or a training checkpoint);
        its EMA weights are used."""
        mf = read_model_file(path)
        model = load_generator(mf, path)
        cfg = mf.config
        try:
            text, diffusion = cfg["text"], DiffusionConfig(**cfg["diffusion"])
        except (KeyError, TypeError):
            raise CheckpointError(
                f"{path} is a moas file but not a model (no configuration in it)."
            ) from None
        encoder = TextEncoder(
            text_model_name or text["model_name"], max_tokens=text["max_tokens"], require_id=mf.text_encoder
        )
        enhance = cfg.get("enhance") or {}
        pipe = cls(
            model,
            encoder,
            diffusion,
            device,
            short_hash(path),
            saved_sample_config(cfg.get("sample")),
            enhance.get("mode", "full"),
        )
        pipe.style_db = mf.style_db
        pipe.loss_weights = dict(cfg.get("losses") or {})
        pipe.model_config, pipe.provenance = cfg, dict(mf.provenance)
        pipe.enhancer = load_enhancer(mf, path, enhance.get("device", "cpu"))
        pipe.sr = load_sr_upscaler(mf, path, device)
        return pipe

    @property
    def resolution(self) -> int:
        return self.model.resolution

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The generator's text inputs for ``prompts``, on the pipeline's device. Encoding is host work."""
        with host_work():
            text = caption_inputs(self.encoder, prompts, "cpu")
        return {k: v.to(self.device) for k, v in text.items()}

    @torch.no_grad()
    def explain(self, prompt: str) -> str:
        """What the brain makes of a prompt: routing weight per expert (and per tag, with tag routing), top
        emotions, detected language."""
        from moas.models.moe import describe_routing
        from moas.models.routing_info import describe_tag_routing
        from moas.models.understanding import EMOTIONS
        from moas.text.encoder import split_tags
        from moas.text.language import LANGUAGES

        if self.model.conditioning != "moas":
            return (
                "This model uses text-only conditioning (no expert routing or emotion analysis to explain)."
            )
        text = self.encode([prompt])
        cond = self.model.condition(text)
        moe = self.model.stage("moe")
        lines = [f"Prompt language: {LANGUAGES[int(text['language'][0])]}", "Expert routing weights:"]
        lines.append(describe_routing(cond["routing"][0], moe.names))
        if "tag_routing" in cond:
            lines.append("Per-tag routing (tag [keyword category] → top experts):")
            lines.append(describe_tag_routing(split_tags(prompt), cond["tag_routing"][0], moe.names))
        top = cond["emotion_scores"][0].float().cpu().topk(3)
        pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        lines.append("Top emotions: " + ", ".join(f"{EMOTIONS[i]} {v:.3f}" for v, i in pairs))
        return "\n".join(lines)

    def settings(
        self, steps: int | None = None, guidance_scale: float | None = None, sampler: str | None = None
    ) -> tuple[int, float, str]:
        """(steps, guidance scale, sampler): the given ones, else the model's own defaults."""
        sd = self.sample_defaults
        return (
            sd.steps if steps is None else steps,
            sd.guidance_scale if guidance_scale is None else guidance_scale,
            sampler or sd.sampler,
        )

    def denoise(self, x: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The generator's prediction in float32 (what the samplers step with). The conditioning depends on
        the text alone (the brain has no dropout here), so it is computed once per text dict — the sampler
        passes the same one at every step — and the U-Net alone runs each step: the same numbers as
        ``self.model(x, t, text)``, without the brain's forward pass at every step. On a GPU both run in
        bf16 where it is native (``moas.device.inference_dtype``)."""
        with autocast_or_not(self.device, self.amp):
            if self._cond_text is not text:
                self._cond, self._cond_text = self.model.condition(text), text
            c = self._cond
            unet = self.model.unet
            return unet(
                x, t, c["context"], c["context_mask"], c["pooled"].to(x.dtype), text.get("augment")
            ).float()

    def branches(self, prompts: list[str], negative_prompt: str = "") -> tuple[dict, dict]:
        """The conditional and unconditional inputs of classifier-free guidance (padded to one length): the
        prompts, and the negative prompt for each. The style token joins the conditional branch only."""
        n = len(prompts)
        both = self.encode(prompts + [negative_prompt] * n)
        cond = {k: v[:n] for k, v in both.items()}
        uncond = {k: v[n:] for k, v in both.items()}
        if self.style is not None:
            style = self.style.to(self.device).expand(n, -1)  # (B, S)
            cond["style"], uncond["style"] = style, style
            cond["style_mask"] = torch.ones(n, dtype=torch.bool, device=self.device)  # (B,)
            uncond["style_mask"] = torch.zeros_like(cond["style_mask"])
        return cond, uncond

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        seeds: list[int],
        negative_prompt: str = "",
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        progress: bool = False,
        batch_size: int = 16,
        panels: torch.Tensor | None = None,
        init_images: torch.Tensor | None = None,
        strength: float = 1.0,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Images as uint8 (B, 3, H, W) at ``size`` = (W, H), by default the model's base square; unset
        sampler settings are the model's own (``sample_defaults``). Any other size should be one of the
        model's training buckets (``moas.inference.aspect``); the U-Net needs its sides divisible by its
        downsampling factor.

        ``panels``: previous panels uint8 (B, K, 3, H, W), nearest first, for the memory expert (panel
        mode). They join the conditional branch only — the unconditional branch is the null prompt with
        no memory, which is what condition dropout trained (memory is dropped with the text), so guidance
        pushes toward the previous panels as it pushes toward the prompt.

        ``init_images``: uint8 (B, 3, H, W) at ``size`` for image-to-image; ``strength`` in [0, 1]
        is how much of the schedule is run from them (0 returns them, 1 is text-to-image)."""
        steps, guidance_scale, sampler = self.settings(steps, guidance_scale, sampler)
        width, height = size or (self.resolution, self.resolution)
        out = []
        for i in range(0, len(prompts), batch_size):
            p, s = prompts[i : i + batch_size], seeds[i : i + batch_size]
            cond, uncond = self.branches(p, negative_prompt)
            if panels is not None and getattr(self.model, "panel_memory", False) and panels.shape[1] > 0:
                hist = panels[i : i + batch_size].to(self.device)  # (B, K, 3, H, W)
                cond["panel_images"], uncond["panel_images"] = hist, hist  # guidance batches both branches
                cond["panel_mask"] = torch.ones(hist.shape[:2], dtype=torch.bool, device=self.device)
                uncond["panel_mask"] = torch.zeros_like(cond["panel_mask"])  # no memory: nothing encoded
            init = None if init_images is None else to_model_range(init_images[i : i + batch_size])
            x = sample(
                guided(self.denoise, cond, uncond, guidance_scale),
                make_sampler(sampler, self.train_config),
                s,
                (3, height, width),
                steps,
                guidance_scale,
                self.device,
                progress=progress,
                init=init,
                strength=strength,
            )
            out.append(to_uint8(x).cpu())
        return torch.cat(out, 0)
