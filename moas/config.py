"""Configuration: nested dataclasses, TOML profiles, ``MOAS_*`` environment variables, CLI overrides.

Resolution order (later wins): dataclass defaults → profile ``configs/<profile>.toml`` → ``--config FILE``
→ ``MOAS_<SECTION>_<FIELD>`` variables (also read from ``.env``) → command-line flags. Builders read the
config; components take plain typed arguments.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moas.config_sections import (
    BrainConfig,
    EnhanceConfig,
    LossConfig,
    MonitorConfig,
    ResourceConfig,
    SRConfig,
    _check,
)
from moas.diffusion.registry import SAMPLER_NAMES
from moas.errors import ConfigError
from moas.text import TEXT_WIDTH

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILES = ("cpu_tiny", "rtx3060_12gb", "original")
DEFAULT_PROFILE = "cpu_tiny"


@dataclass
class DataConfig:
    data_dir: str = (
        "data/train"  # folder of images (+ optional .txt captions paired by stem), searched recursively
    )
    val_dir: str | None = None  # optional validation folder
    resolution: int = 32  # training side length in pixels (square centre crop); the U-Net's base resolution
    cache_dir: str = "cache/preprocessed"  # content-keyed tensor cache of decoded, resized pixels
    num_workers: int = 0  # DataLoader worker processes (0 = load in the main process)
    ram_cache_gb: float = 1.0  # cache entries kept in RAM after their first read (shared among workers)
    max_bad_fraction: float = 0.5  # stop before epoch 1 if more than this fraction of files is unreadable
    bucketing: bool = False  # aspect-ratio buckets (area ≈ resolution²) instead of the square centre crop
    bucket_max_aspect: float = 2.0  # most elongated bucket allowed (long side / short side)
    # Images without a .txt/.caption file are captioned from their folder and file names (elves/archer.png:
    # "elves, archer"); numbers, hashes and camera names give nothing. On: a folder sorted by character or
    # kind says what its images show, and an uncaptioned image otherwise trains on the empty prompt.
    captions_from_names: bool = True
    # An image smaller than its training size: "upscale" (kept, softer than the others; the run says how
    # many) or "skip" (left out, each with its reason in the dataset report). Upscale: a real folder had a
    # quarter of its images under 256 px, too many to lose by default.
    small_images: str = "upscale"
    keep_tokens: int = 0  # leading caption tags never shuffled or dropped (e.g. the character name)
    shuffle_tags: bool = False  # shuffle the other comma-separated tags every epoch
    tag_dropout: float = 0.0  # per-epoch probability of dropping each non-kept tag
    caption_dropout: float = 0.0  # per-epoch probability of training an image on the empty caption
    extract_style: bool = False  # style fingerprints per artist folder → one extra conditioning token
    style_dropout: float = 0.1  # probability of hiding the style token in a training step
    # Non-leaky image augmentation (moas.data.augment): each transform applied with this probability and
    # its parameters given to the U-Net (zeros at sampling). 0 = off.
    augment: float = 0.0
    augment_flip: bool = True  # mirror (left/right swapped in the caption)
    augment_max_zoom: float = 1.25  # zoom-in up to this factor; crops stay inside the picture
    augment_max_rotation: float = 5.0  # degrees
    augment_color: float = 0.1  # brightness ±, contrast and saturation ×exp(±) this much
    augment_margin: float = 1.25  # the cache keeps the crop this much larger to crop from

    def __post_init__(self) -> None:
        _check(
            self.resolution >= 16 and self.resolution % 8 == 0,
            "data.resolution must be a multiple of 8, at least 16",
        )
        _check(self.num_workers >= 0, "data.num_workers must be 0 or more")
        _check(self.ram_cache_gb >= 0, "data.ram_cache_gb must be 0 or more")
        _check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction must be between 0 and 1")
        _check(self.bucket_max_aspect >= 1.0, "data.bucket_max_aspect must be at least 1")
        _check(self.keep_tokens >= 0, "data.keep_tokens must be 0 or more")
        _check(self.small_images in ("upscale", "skip"), "data.small_images must be upscale or skip")
        for name in ("tag_dropout", "caption_dropout", "style_dropout"):
            _check(0.0 <= getattr(self, name) < 1.0, f"data.{name} must be in [0, 1)")
        _check(0.0 <= self.augment <= 1.0, "data.augment must be a probability in [0, 1]")
        _check(self.augment_max_zoom >= 1.0, "data.augment_max_zoom must be at least 1")
        _check(0.0 <= self.augment_max_rotation <= 45.0, "data.augment_max_rotation must be 0-45 degrees")
        _check(0.0 <= self.augment_color <= 1.0, "data.augment_color must be in [0, 1]")
        _check(self.augment_margin >= 1.0, "data.augment_margin must be at least 1")


@dataclass
class TextConfig:
    model_name: str = (
        "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"  # used when available locally
    )
    max_tokens: int = 77  # per-token context is truncated here
    use_tags: bool = True  # add one context token per comma-separated tag (order-free, compositional)
    use_tokens: bool = True  # add the transformer's per-token embeddings to the context

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 2, "text.max_tokens must be at least 2")
        _check(self.use_tags or self.use_tokens, "text.use_tags and text.use_tokens cannot both be false")


@dataclass
class ModelConfig:
    block_channels: list[int] = field(default_factory=lambda: [64, 128, 192])  # U-Net width per level
    cross_attention: list[bool] = field(
        default_factory=lambda: [False, True, True]
    )  # cross-attn at each level
    layers_per_block: int = 1
    attention_head_dim: int = 32  # channels per attention head: a level of C channels has C // this heads
    cross_attention_dim: int = TEXT_WIDTH  # text/context width (the original's 768)
    norm_num_groups: int = 32
    conditioning_layers: int = 1  # zero-initialised residual MLP blocks in the ConditioningEncoder
    patch_size: int = 1  # fold p×p pixel patches into channels before the U-Net (p² cheaper top level)
    # Set only for model files saved before the head rule above: they ran attention_head_dim heads at every
    # level (moas.models.upgrade sets it when loading them); new models never set it.
    legacy_head_count: bool = False

    def __post_init__(self) -> None:
        _check(
            len(self.block_channels) == len(self.cross_attention),
            "model.block_channels and model.cross_attention need the same length",
        )
        _check(
            any(self.cross_attention),
            "model.cross_attention must enable cross-attention at one level at least",
        )
        _check(
            all(c % self.norm_num_groups == 0 for c in self.block_channels),
            "model.block_channels must be multiples of model.norm_num_groups",
        )
        _check(self.patch_size in (1, 2, 4), "model.patch_size must be 1, 2 or 4")
        _check(
            self.legacy_head_count
            or all(
                c % self.attention_head_dim == 0
                for c, a in zip(self.block_channels, self.cross_attention, strict=True)
                if a
            ),
            "model.attention_head_dim (channels per head) must divide the width of every cross-attention level",
        )
        _check(
            self.cross_attention_dim == TEXT_WIDTH,
            f"model.cross_attention_dim must be {TEXT_WIDTH} (the text encoder's width)",
        )


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # diffusers beta schedule name
    prediction_type: str = "v_prediction"  # "v_prediction" or "epsilon"
    min_snr_gamma: float = 5.0  # Min-SNR-γ loss weighting (Hang et al. 2023); 0 disables
    cond_dropout: float = 0.1  # probability of training on the null prompt (enables classifier-free guidance)

    def __post_init__(self) -> None:
        _check(
            self.prediction_type in ("v_prediction", "epsilon"),
            "diffusion.prediction_type must be v_prediction or epsilon",
        )
        _check(
            self.beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"),
            "diffusion.beta_schedule must be linear, scaled_linear or squaredcos_cap_v2",
        )
        _check(0.0 <= self.cond_dropout < 1.0, "diffusion.cond_dropout must be in [0, 1)")
        _check(self.min_snr_gamma >= 0, "diffusion.min_snr_gamma must be 0 or more")


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-5
    eps: float = 1e-8
    amsgrad: bool = True
    warmup_fraction: float = 0.17  # the original's 44 of 260 epochs
    restart_fraction: float = 0.25  # CosineAnnealingWarmRestarts T_0 as a fraction of the run (65 of 260)
    restart_mult: int = 2  # T_mult
    eta_min: float = 1e-8
    grad_accum_steps: int = 1
    max_grad_norm: float = 0.5
    loss_clamp: float = 50.0  # NaN/Inf guard: clamp the loss here; skip the batch if still not finite
    # Steps between host reads of the step's values (log line, TensorBoard, the guard's skip accounting).
    # Above 1 the guard decides on the device (moas.train.trained_net: no GPU sync per step).
    read_every: int = 1
    ema_decay: float = 0.999  # upper bound; early steps use (1 + n) / (10 + n)
    mixed_precision: str = (
        "auto"  # auto (bf16 if supported, else fp16 + GradScaler; fp32 on CPU) | native | bf16 | fp16 | no
    )
    save_every: int = 5  # epochs between checkpoints (the final epoch is always saved)
    save_every_steps: int = 0  # also write checkpoint_<step>.pt every N optimizer steps (0 = off)
    milestones: bool = True  # also save (and never delete) the original's milestone epochs, scaled to the run
    keep_last: int = 30  # epoch_*.pt (and checkpoint_*.pt) files kept; milestones are never deleted
    keep_optimizer_last: int = 3  # only the newest N epoch/step checkpoints keep optimizer state (0 = all)
    # What the older ones keep (docs/training.md, "Checkpoint policy"): full | thinned (no optimizer
    # state) | ema_bf16 (the EMA generator in bf16 + the enhancer: weights only, not resumable).
    old_checkpoint: str = "thinned"
    keep_emergency: int = 2  # emergency_*.pt (out of memory, crashes) kept; newer than the last save never go
    min_batch_size: int = 1  # out-of-memory recovery stops below this micro-batch (the original's 2)
    adaptive_lr: bool = False  # AdaptiveTrainingSystem: scale the lr from the recent loss curve
    adaptive_window: int = 10  # optimizer steps per AdaptiveTrainingSystem decision
    sample_every: int = 5  # epochs between TensorBoard sample grids
    seed: int = 0
    checkpoint_dir: str = "checkpoints"
    save_path: str = "models/best_model.safetensors"  # the model for generation (EMA weights, arguments)
    auto_resume: bool = False
    init_from: str = ""  # a model file whose weights start this run (fine-tuning); fresh optimizer + schedule
    stage: str = "all"  # all | sr: only the super-resolution stage, added to the init_from model (--stage)
    run_dir: str = "runs"
    log_dir: str = "logs"
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit; for tests and benchmarks)
    panel_context: int = (
        2  # previous panels of a sequence (<stem>_p<N> files) fed to the memory expert; 0 = off
    )
    # Speed switches of the U-Net (moas.train.speed); none changes what is computed beyond float rounding.
    gradient_checkpointing: bool | str = "auto"  # true | false | auto (off unless the memory planner asks)
    channels_last: bool | str = "auto"  # NHWC U-Net weights: true | false | auto (on for CUDA, off elsewhere)
    compile: bool = False  # torch.compile the U-Net's forward (uncompiled, after one warning, if it fails)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs must be at least 1")
        _check(self.batch_size >= 1, "train.batch_size must be at least 1")
        _check(self.lr > 0, "train.lr must be positive")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas must be two numbers in [0, 1)",
        )
        _check(0.0 <= self.warmup_fraction < 1.0, "train.warmup_fraction must be in [0, 1)")
        _check(0.0 < self.restart_fraction <= 1.0, "train.restart_fraction must be in (0, 1]")
        _check(self.restart_mult >= 1, "train.restart_mult must be at least 1")
        _check(self.grad_accum_steps >= 1, "train.grad_accum_steps must be at least 1")
        _check(self.read_every >= 1, "train.read_every must be at least 1")
        _check(0.0 <= self.ema_decay < 1.0, "train.ema_decay must be in [0, 1)")
        _check(
            self.mixed_precision in ("auto", "native", "bf16", "fp16", "no"),
            "train.mixed_precision must be auto, native, bf16, fp16 or no",
        )
        _check(self.save_every >= 1 and self.sample_every >= 0, "train.save_every must be at least 1")
        _check(self.keep_last >= 1, "train.keep_last must be at least 1")
        _check(self.save_every_steps >= 0, "train.save_every_steps must be 0 or more")
        _check(self.keep_optimizer_last >= 0, "train.keep_optimizer_last must be 0 or more")
        _check(
            self.old_checkpoint in ("full", "thinned", "ema_bf16"),
            "train.old_checkpoint must be full, thinned or ema_bf16",
        )
        _check(self.keep_emergency >= 0, "train.keep_emergency must be 0 or more")
        _check(self.min_batch_size >= 1, "train.min_batch_size must be at least 1")
        _check(self.stage in ("all", "sr"), "train.stage must be all or sr")
        _check(self.adaptive_window >= 4, "train.adaptive_window must be at least 4")
        _check(self.max_steps >= 0, "train.max_steps must be 0 or more")
        _check(0 <= self.panel_context <= 8, "train.panel_context must be between 0 and 8")
        for name in ("gradient_checkpointing", "channels_last"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() in ("true", "false"):  # MOAS_TRAIN_* variables
                setattr(self, name, value.lower() == "true")
            _check(getattr(self, name) in ("auto", True, False), f"train.{name} must be true, false or auto")


@dataclass
class SampleConfig:
    sampler: str = "dpmsolver++"  # a name of moas.diffusion.registry.SAMPLERS
    steps: int = 20
    guidance_scale: float = 3.0  # classifier-free guidance scale (1 = off)
    negative_prompt: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.sampler in SAMPLER_NAMES, f"sample.sampler must be one of {', '.join(SAMPLER_NAMES)}")
        _check(1 <= self.steps <= 1000, "sample.steps must be between 1 and 1000")
        _check(self.guidance_scale >= 0, "sample.guidance_scale must be 0 or more")


@dataclass
class MoasConfig:
    profile: str = DEFAULT_PROFILE
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    brain: BrainConfig = field(default_factory=BrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    enhance: EnhanceConfig = field(default_factory=EnhanceConfig)
    sr: SRConfig = field(default_factory=SRConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dict_to_toml(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoasConfig:
        return _build(cls, d, "")


SECTIONS = {f.name: f.type for f in dataclasses.fields(MoasConfig) if f.name != "profile"}


def _section_classes() -> dict[str, type]:
    return {
        "data": DataConfig,
        "text": TextConfig,
        "model": ModelConfig,
        "diffusion": DiffusionConfig,
        "train": TrainConfig,
        "sample": SampleConfig,
        "resources": ResourceConfig,
        "brain": BrainConfig,
        "monitor": MonitorConfig,
        "losses": LossConfig,
        "enhance": EnhanceConfig,
        "sr": SRConfig,
    }


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(
            f"Unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(sorted(where + k for k in unknown))}."
        )
    kwargs = {}
    sections = _section_classes() if cls is MoasConfig else {}
    for k, v in d.items():
        if k in sections:
            if not isinstance(v, dict):
                raise ConfigError(f"Config section [{k}] must be a table.")
            kwargs[k] = _build(sections[k], v, f"{k}.")
        else:
            kwargs[k] = v
    return cls(**kwargs)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def profile_dirs() -> list[Path]:
    """Where profiles are looked up: ./configs, then the configs/ folder beside the package."""
    return [Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"]


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"Config file {path} is not valid TOML ({e}).") from None


def profile_path(profile: str) -> Path:
    for d in profile_dirs():
        p = d / f"{profile}.toml"
        if p.is_file():
            return p
    known = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.toml")})
    raise ConfigError(f"Unknown profile '{profile}'; known profiles: {', '.join(known) or 'none found'}.")


def _coerce(value: str, default: Any, name: str) -> Any:
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            return json.loads(value)
        if value.lower() in ("", "none", "null"):
            return None
        return value
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"Environment variable {name}={value!r} has the wrong type.") from None


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Collect ``MOAS_<SECTION>_<FIELD>`` variables (e.g. ``MOAS_TRAIN_LR=3e-4``) into a nested dict."""
    environ = dict(os.environ if environ is None else environ)
    out: dict[str, Any] = {}
    defaults = MoasConfig()
    for section, cls in _section_classes().items():
        sec_default = getattr(defaults, section)
        for f in dataclasses.fields(cls):
            name = f"MOAS_{section.upper()}_{f.name.upper()}"
            if name in environ:
                out.setdefault(section, {})[f.name] = _coerce(
                    environ[name], getattr(sec_default, f.name), name
                )
    return out


def load_dotenv_file() -> None:
    """Load ``.env`` from the working directory into the environment (existing variables win)."""
    try:
        from dotenv import load_dotenv
    except ImportError:  # pragma: no cover - python-dotenv is a declared dependency
        return
    load_dotenv(Path.cwd() / ".env", override=False)


def load_config(
    profile: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    use_env: bool = True,
) -> MoasConfig:
    if use_env:
        load_dotenv_file()
    profile = profile or (os.environ.get("MOAS_PROFILE") if use_env else None) or DEFAULT_PROFILE
    merged: dict[str, Any] = {"profile": profile}
    merged = deep_merge(merged, read_toml(profile_path(profile)))
    if config_file:
        merged = deep_merge(merged, read_toml(Path(config_file)))
    if use_env:
        merged = deep_merge(merged, env_overrides())
    if overrides:
        merged = deep_merge(merged, overrides)
    merged["profile"] = profile
    return MoasConfig.from_dict(merged)


def dict_to_toml(d: dict[str, Any]) -> str:
    """Write a two-level dict of plain values as TOML (enough for MoasConfig)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    top = [f"{k} = {fmt(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
    lines = top + [""] if top else []
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{kk} = {fmt(vv)}" for kk, vv in v.items() if vv is not None]
            lines.append("")
    return "\n".join(lines)


def lr_batch_warning(cfg: MoasConfig) -> str | None:
    """A sentence when the effective batch is at most half its profile's while the peak learning rate is
    still the profile's (or higher): the profiles' rates are tuned for their batch, and a smaller batch at the
    same rate can blow a run up. Measured: ``cpu_tiny`` at batch 8 with its lr 1e-3 collapsed after ~500
    steps to a flat loss it never left (bench/RESULTS.md, "Memorisation reached"). None when it is fine."""
    try:
        t = read_toml(profile_path(cfg.profile)).get("train", {})
    except ConfigError:
        return None
    profile_batch = int(t.get("batch_size", TrainConfig.batch_size)) * int(t.get("grad_accum_steps", 1))
    profile_lr = float(t.get("lr", TrainConfig.lr))
    batch = cfg.train.batch_size * cfg.train.grad_accum_steps
    if 2 * batch > profile_batch or cfg.train.lr < profile_lr:
        return None
    scaled = cfg.train.lr * batch / profile_batch
    return (
        f"The effective batch is {batch} but the learning rate {cfg.train.lr:g} is tuned for the "
        f"{cfg.profile} profile's {profile_batch}; a smaller batch at the same rate can make training collapse, "
        f"so consider --lr {scaled:.2g} (scaled with the batch)."
    )
