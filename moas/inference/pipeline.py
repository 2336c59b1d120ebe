"""Text → image with a trained generator: the text encoder, the sampler and classifier-free guidance.

Used by ``moas generate``, ``moas eval`` and the training run's sample grids.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moas.checkpoint import load_checkpoint
from moas.config import DiffusionConfig
from moas.data.dataset import to_uint8
from moas.diffusion.sampling import guided, make_sampler, sample
from moas.diffusion.schedule import make_train_scheduler
from moas.errors import CheckpointError, MoasError
from moas.io import short_hash
from moas.models.enhance import QualityEnhancer
from moas.models.generator import MoasGenerator, generator_from_state
from moas.models.gnn import EnhancedGNN
from moas.models.panel_memory import PanelMemory
from moas.resources import L3CacheManager
from moas.text.encoder import TextEncoder
from moas.text.language import language_batch

log = logging.getLogger(__name__)


def load_enhancer(state: dict, path: str | Path, device: str = "cpu") -> QualityEnhancer | None:
    """The model file's trained enhancer on ``device`` (the original runs it on the CPU), or None."""
    entry = state.get("enhancer")
    domain = state.get("domain") or {}
    if entry is None and "enhancer" in domain:  # a training checkpoint: the weights sit with the trainer's
        e = state["config"].get("enhance", {})
        args = {k: e[k] for k in ("width", "sr_channels", "sr_blocks") if k in e}
        entry = {"args": args, "weights": domain["enhancer"]}
    if entry is None:
        return None
    try:
        enhancer = QualityEnhancer(**entry["args"])
        enhancer.load_state_dict(entry["weights"])
    except (KeyError, TypeError, RuntimeError):
        raise CheckpointError(f"{path} has enhancer weights that do not fit this version of moas.") from None
    dev = torch.device(device if device == "cpu" or torch.cuda.is_available() else "cpu")
    return enhancer.eval().to(dev)


class Pipeline:
    def __init__(
        self,
        model: MoasGenerator,
        encoder: TextEncoder,
        diffusion: DiffusionConfig,
        device: torch.device,
        model_hash: str = "",
        sample_defaults: dict | None = None,
    ) -> None:
        self.model = model.eval().place(device)
        self.encoder = encoder
        self.diffusion = diffusion
        self.device = device
        self.model_hash = model_hash
        self.sample_defaults = dict(sample_defaults or {})  # the model config's [sample] section
        self.train_config = dict(make_train_scheduler(diffusion).config)
        self.style_db: dict | None = None  # the artist style database saved with the model (issue 4)
        self.style: torch.Tensor | None = None  # fingerprint used by __call__ (set_style)
        self.enhancer = None  # the trained QualityEnhancer (moas/models/enhance.py), when the file has one
        self.enhance_mode = self.sample_defaults.pop("enhance_mode", "full")
        self.loss_weights: dict = {}  # the model config's [losses] (temporal metric weights for panels)
        # GNN outputs and the encoded previous panels are cached across sampler steps (the original's
        # L3CacheManager use at inference).
        self.l3_cache = L3CacheManager()
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
        """Load a model file (or a training checkpoint); its EMA weights are used."""
        state = load_checkpoint(path, map_location="cpu")
        model = generator_from_state(state, path)
        try:
            cfg, encoder_id = state["config"], state["text_encoder"]
        except (KeyError, TypeError):
            raise CheckpointError(
                f"{path} is a moas file but not a model (no configuration in it)."
            ) from None
        encoder = TextEncoder(
            text_model_name or cfg["text"]["model_name"],
            max_tokens=cfg["text"]["max_tokens"],
            require_id=encoder_id,
        )
        defaults = dict(cfg.get("sample") or {}, enhance_mode=cfg.get("enhance", {}).get("mode", "full"))
        pipe = cls(model, encoder, DiffusionConfig(**cfg["diffusion"]), device, short_hash(path), defaults)
        pipe.style_db = state.get("style_db")
        pipe.loss_weights = dict(cfg.get("losses") or {})
        pipe.enhancer = load_enhancer(state, path, cfg.get("enhance", {}).get("device", "cpu"))
        return pipe

    @property
    def resolution(self) -> int:
        return self.model.resolution

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.encoder.encode(prompts)
        text = {"tokens": enc.tokens, "mask": enc.mask, "tags": enc.tags, "tag_mask": enc.tag_mask}
        return text | language_batch(prompts)

    @torch.no_grad()
    def explain(self, prompt: str) -> str:
        """What the brain makes of a prompt: routing weight per expert, top emotions, detected language."""
        from moas.models.moe import describe_routing
        from moas.models.understanding import EMOTIONS
        from moas.text.language import LANGUAGES

        if self.model.conditioning != "moas":
            return (
                "This model uses text-only conditioning (no expert routing or emotion analysis to explain)."
            )
        text = {k: v.to(self.device) for k, v in self.encode([prompt]).items()}
        cond = self.model.condition(text)
        moe = self.model.stage("moe")
        lines = [f"Prompt language: {LANGUAGES[int(text['language'][0])]}", "Expert routing weights:"]
        lines.append(describe_routing(cond["routing"][0], moe.names))
        top = cond["emotion_scores"][0].float().cpu().topk(3)
        pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        lines.append("Top emotions: " + ", ".join(f"{EMOTIONS[i]} {v:.3f}" for v, i in pairs))
        return "\n".join(lines)

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        seeds: list[int],
        negative_prompt: str = "",
        steps: int = 20,
        guidance_scale: float = 3.0,
        sampler: str = "dpmsolver++",
        progress: bool = False,
        batch_size: int = 16,
        panels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images as uint8 (B, 3, H, W) at the model's base resolution.

        ``panels``: previous panels uint8 (B, K, 3, H, W), nearest first, for the memory expert (panel
        mode). They join the conditional branch only — the unconditional branch is the null prompt with
        no memory, which is what condition dropout trained (memory is dropped with the text), so guidance
        pushes toward the previous panels as it pushes toward the prompt."""
        out = []
        for i in range(0, len(prompts), batch_size):
            p, s = prompts[i : i + batch_size], seeds[i : i + batch_size]
            both = self.encode(p + [negative_prompt] * len(p))  # padded to one length
            both = {k: v.to(self.device) for k, v in both.items()}
            cond = {k: v[: len(p)] for k, v in both.items()}
            uncond = {k: v[len(p) :] for k, v in both.items()}
            if self.style is not None:  # the style token joins the conditional branch only
                style = self.style.to(self.device).expand(len(p), -1)  # (B, S)
                cond["style"], uncond["style"] = style, style
                cond["style_mask"] = torch.ones(len(p), dtype=torch.bool, device=self.device)  # (B,)
                uncond["style_mask"] = torch.zeros_like(cond["style_mask"])
            if panels is not None and getattr(self.model, "panel_memory", False) and panels.shape[1] > 0:
                hist = panels[i : i + batch_size].to(self.device)  # (B, K, 3, H, W)
                cond["panel_images"], uncond["panel_images"] = hist, hist  # guidance batches both branches
                cond["panel_mask"] = torch.ones(hist.shape[:2], dtype=torch.bool, device=self.device)
                uncond["panel_mask"] = torch.zeros_like(cond["panel_mask"])  # no memory: nothing encoded
            fn = guided(lambda x, t, text: self.model(x, t, text).float(), cond, uncond, guidance_scale)
            x = sample(
                fn,
                make_sampler(sampler, self.train_config),
                s,
                (3, self.resolution, self.resolution),
                steps,
                guidance_scale,
                self.device,
                progress=progress,
            )
            out.append(to_uint8(x).cpu())
        return torch.cat(out, 0)
