"""The config sections of the networks that train beside the generator or shape its conditioning: the
brain, the domain losses, the enhancer, the super-resolution stage; the run's monitoring and its budgets
(resources). ``moas.config`` holds the core sections (data, text, model, diffusion, train, sample), the whole
``MoasConfig``
and its loading, and re-exports these; the same rules apply (dataclass defaults are the original's values,
profiles override them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moas.errors import ConfigError
from moas.text import TEXT_WIDTH


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message + ".")


@dataclass
class BrainConfig:
    """The conditioning brain (EnhancedMoE, GNN, understanding systems, experts). Defaults = the original's sizes."""

    conditioning: str = "moas"  # moas = the full brain; text = text-only conditioning (ablation, old models)
    expert_dim: int = 512  # width of the 14 experts, the GNN and the structure/art experts
    router_hidden: list[int] = field(default_factory=lambda: [1024, 512])  # router 768→1024→512→14
    hidden_dim: int = 1536  # wide MLP width in the emotion/understanding/compression systems
    expert_heads: int = 8  # heads of each expert's context attention
    cross_expert_heads: int = 16  # heads of the pass-2 cross-expert attention
    gnn_version: int = 4  # which EnhancedGNN is registered as `gnn` (1-4; the others stay built)
    gnn_layers: int = 6  # message-passing layers
    gnn_heads: int = 8  # attention heads per v4 layer
    understanding_layers: int = 6  # DeepUnderstandingSystem TransformerEncoder depth
    understanding_heads: int = 12  # its attention heads (must divide 768 and understanding_token_dim)
    understanding_ff: int = 3072  # its feed-forward width
    understanding_token_dim: int | None = None  # its d_model; None = 768, the text width (the original)
    expert_context: bool = True  # experts attend to the text tokens (the original's optional context)
    dropout: float = 0.1
    load_balance_weight: float = 0.01  # weight of the MoE load-balance loss E·Σp̄²−1
    compression: bool = False  # AdvancedCompressionSystem on the pooled text (adds its reconstruction loss)
    compression_ratio: float = 0.5  # 768 → 384
    continuous_learning: bool = (
        True  # AdvancedContinuousLearning adjusts routing bias/expert weights per epoch
    )
    continuous_rate: float = 0.5  # its step size (logit units per unit of relative load imbalance)
    placement: str = "original"  # original: compression on the CPU when CUDA is used; single: one device
    # Panels: the memory expert attends to previous panels' VisionEncoder features.
    panel_memory: bool = True  # build PanelMemory + the memory expert's gated memory attention
    panel_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # its CNN widths
    panel_max_distance: int = 8  # panel-position embeddings (distance back); farther panels share the last
    memory_pooled: bool = (
        True  # also feed the panel memory straight into the pooled conditioning (MemoryBridge)
    )
    memory_context: bool = True  # and into the first cross-attention token (MemoryBridge.context_proj)
    # Specialisation (docs/brain.md#specialisation); every one off by default, so older models are unchanged.
    tag_routing: bool = False  # route each caption tag over the experts; each expert reads its routed tags
    tag_prior: float = 2.0  # with tag_routing: router-logit bias toward a tag's keyword category's expert
    aux_targets: float = 0.0  # weight of the per-expert image targets (palette, edges, light, …); 0 = off
    expert_tokens: bool = False  # one cross-attention token per expert and one for the GNN output

    def __post_init__(self) -> None:
        _check(self.conditioning in ("moas", "text"), "brain.conditioning must be moas or text")
        _check(self.tag_prior >= 0 and self.aux_targets >= 0, "brain.tag_prior and aux_targets must be ≥ 0")
        _check(
            len(self.panel_channels) >= 1 and min(self.panel_channels) >= 1,
            "brain.panel_channels must be one or more positive widths",
        )
        _check(self.panel_max_distance >= 1, "brain.panel_max_distance must be at least 1")
        _check(self.gnn_version in (1, 2, 3, 4), "brain.gnn_version must be 1, 2, 3 or 4")
        _check(self.expert_dim >= 16, "brain.expert_dim must be at least 16")
        _check(
            self.expert_dim % self.expert_heads == 0
            and self.expert_dim % self.cross_expert_heads == 0
            and self.expert_dim % self.gnn_heads == 0,
            "brain.expert_dim must be divisible by expert_heads, cross_expert_heads and gnn_heads",
        )
        _check(
            TEXT_WIDTH % self.understanding_heads == 0, f"brain.understanding_heads must divide {TEXT_WIDTH}"
        )
        _check(
            self.understanding_token_dim is None
            or (
                self.understanding_token_dim >= 1
                and self.understanding_token_dim % self.understanding_heads == 0
            ),
            "brain.understanding_token_dim must be a positive multiple of brain.understanding_heads",
        )
        _check(
            len(self.router_hidden) == 2 and min(self.router_hidden) >= 1,
            "brain.router_hidden must be two widths",
        )
        _check(
            self.gnn_layers >= 1 and self.understanding_layers >= 1, "brain layer counts must be at least 1"
        )
        _check(self.hidden_dim >= 1 and self.understanding_ff >= 1, "brain widths must be positive")
        _check(0.0 <= self.dropout < 1.0, "brain.dropout must be in [0, 1)")
        _check(self.load_balance_weight >= 0, "brain.load_balance_weight must be 0 or more")
        _check(0.0 < self.compression_ratio < 1.0, "brain.compression_ratio must be in (0, 1)")
        _check(self.continuous_rate >= 0, "brain.continuous_rate must be 0 or more")
        _check(self.placement in ("original", "single"), "brain.placement must be original or single")


@dataclass
class MonitorConfig:
    val_fraction: float = 0.05  # without --val_dir: share of the training folder held out for validation
    val_min_images: int = 20  # hold nothing out when the training folder has fewer images than this
    eval_n: int = 8  # demo data: images per split (held-out, seen) of the eval run at each checkpoint
    select_best: bool = True  # keep train.save_path = the checkpoint with the best model-quality score
    # Folder eval at each checkpoint (moas.eval.folder_score): a tag model trained on the folder's captions
    # scores adherence and KID, and a checkpoint whose samples copy training images is never chosen.
    folder_eval: bool = True
    folder_eval_n: int = 32  # images generated per checkpoint
    memorisation_limit: float = 0.1  # never pick a checkpoint with more than this share of copied samples
    tagger_steps: int = 600  # the tag model's training budget in optimizer steps (once; it is cached)
    sample_prompts: str | None = None  # file of sample-grid prompts (one per line, --seed/--steps/--scale)
    creativity_samples: int = (
        4  # images of the first sample prompt (different seeds) for the creativity score
    )
    measure_every: int = 10  # optimizer steps between expert/art-theory measurements and RAM/VRAM readings
    dashboard: bool = True  # live console dashboard (off with --quiet)
    dashboard_every_s: float = 30.0  # seconds between plain dashboard lines when output is not a terminal

    def __post_init__(self) -> None:
        _check(0.0 <= self.val_fraction < 1.0, "monitor.val_fraction must be in [0, 1)")
        _check(self.val_min_images >= 2, "monitor.val_min_images must be at least 2")
        _check(self.eval_n >= 1, "monitor.eval_n must be at least 1")
        _check(self.folder_eval_n >= 3, "monitor.folder_eval_n must be at least 3")
        _check(0.0 <= self.memorisation_limit <= 1.0, "monitor.memorisation_limit must be in [0, 1]")
        _check(self.tagger_steps >= 1, "monitor.tagger_steps must be at least 1")
        _check(self.creativity_samples >= 2, "monitor.creativity_samples must be at least 2")
        _check(self.measure_every >= 1, "monitor.measure_every must be at least 1")
        _check(self.dashboard_every_s >= 0, "monitor.dashboard_every_s must be 0 or more")


@dataclass
class LossConfig:
    """The domain losses (``moas/losses``) on the diffusion model's predicted x0, and the discriminator."""

    domain: bool = False  # add the domain losses to the diffusion loss (off by default: see bench/RESULTS.md)
    domain_weight: float = 0.1  # weight of the domain-loss total relative to the diffusion loss
    low_noise_power: float = 2.0  # per-sample weight ᾱ_t^p on the x0 losses: favours low-noise timesteps
    pixel: float = 1.0  # combined loss: L1 under mixed precision, else mse_weight·MSE + l1_weight·L1
    mse_weight: float = 0.5
    l1_weight: float = 0.5
    ssim: float = 0.2  # 1 − SSIM (Gaussian window 11, σ 1.5)
    line_art: float = 0.2  # Sobel edge structure + Laplacian thickness
    color: float = 0.1  # colour distribution (soft histograms, moments, saturation)
    style: float = 0.2  # Gram matrices of the anatomical detector's features (the original's 0.2)
    anatomy: float = 0.1  # AnatomicalDetector feature matching (0.5 face, 0.3 hands, 0.2 eyes)
    perceptual: float = 0.1  # VGG16 features; only with local pretrained weights, else off with a notice
    vgg_weights: str | None = None  # a VGG16 state-dict file; default: the torch hub cache
    adversarial: bool = False  # train AnimeStyleDiscriminator and add the generator's GAN term
    gan: float = 0.01  # weight of the generator's GAN term (small; see bench/RESULTS.md)
    disc_warmup_steps: int = 100  # optimizer steps before the discriminator trains and its term is used
    disc_base_channels: int = 48  # AnimeStyleDiscriminator base width (the original's 48)
    # Temporal consistency (panels): x0 prediction vs the previous panel, only for samples that have one.
    temporal_weight: float = 0.05  # weight of 0.5·feature + character·w_c + scene·w_s in the total (0 = off)
    temporal_character_weight: float = 0.3  # the original's character_weight (value not given there)
    temporal_scene_weight: float = 0.2  # the original's scene_weight (value not given there)

    def __post_init__(self) -> None:
        weights = (self.temporal_weight, self.temporal_character_weight, self.temporal_scene_weight)
        weights += (self.domain_weight, self.pixel, self.mse_weight, self.l1_weight, self.ssim, self.line_art)
        weights += (self.color, self.style, self.anatomy, self.perceptual, self.gan, self.low_noise_power)
        _check(all(w >= 0 for w in weights), "losses weights must be 0 or more")
        _check(self.disc_warmup_steps >= 0, "losses.disc_warmup_steps must be 0 or more")
        _check(self.disc_base_channels >= 8, "losses.disc_base_channels must be at least 8")


@dataclass
class EnhanceConfig:
    """The QualityEnhancer (super-resolution + detail + colour + multi-scale), trained on degraded pairs."""

    train: bool = True  # train the enhancer during ``moas train`` (its weights go into the model file)
    width: int = 128  # detail/colour/multi-scale width (the original's 128; 2·width stands for its 256)
    sr_channels: int = 64  # SuperResolutionSystem width (the original's 64)
    sr_blocks: int = 8  # residual blocks (the original's 8)
    lr: float = 2e-4  # the enhancer's AdamW learning rate
    batch_size: int = 8  # (degraded → original) pairs per enhancer step
    every: int = 1  # one enhancer step every this many generator optimizer steps
    scale: int = 2  # HR training side = data.resolution × scale; pairs are made for ×2 and ×4
    mode: str = "full"  # default --quality_enhance at generation: full | resolution | detail | color | none
    device: str = "cpu"  # where generation runs the enhancer (the original keeps it on the CPU)

    def __post_init__(self) -> None:
        _check(
            self.width >= 4 and self.sr_channels >= 4,
            "enhance.width and enhance.sr_channels must be at least 4",
        )
        _check(self.sr_blocks >= 1, "enhance.sr_blocks must be at least 1")
        _check(
            self.lr > 0 and self.batch_size >= 1 and self.every >= 1,
            "enhance.lr, batch_size and every must be positive",
        )
        _check(self.scale in (2, 4), "enhance.scale must be 2 or 4")
        _check(
            self.mode in ("full", "resolution", "detail", "color", "none"),
            "enhance.mode must be full, resolution, detail, color or none",
        )


@dataclass
class SRConfig:
    """The super-resolution diffusion stage: its own U-Net, conditioned on the upsampled low-resolution image
    (noise-augmented) and the prompt, trained on random crops of the training images at ``scale``× the base
    resolution. Off by default; the profiles turn it on."""

    train: bool = False  # train the stage during ``moas train`` (its EMA weights go into the model file)
    scale: int = 4  # output side = base side × scale
    crop: int = (
        128  # side of the high-resolution training crops (the U-Net is convolutional: any size at use)
    )
    block_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    attention: list[bool] = field(default_factory=lambda: [False, False, True])  # self-attention per level
    layers_per_block: int = 1
    patch_size: int = 1  # p×p pixel patches folded into channels (p² cheaper full-resolution level)
    # sample (x-prediction) | v_prediction | epsilon: at equal training time x-prediction drew clean detail
    # where v-prediction left noise (bench/cascade.py; bench/RESULTS.md, "Cascade")
    prediction_type: str = "sample"
    noise_shift: float = 1.0  # SNR divided by shift²: more noise at every step for larger images
    min_snr_gamma: float = 5.0
    cond_noise_max: float = 0.5  # training: conditioning noise level drawn uniformly from [0, this]
    cond_noise: float = 0.1  # sampling: the fixed conditioning noise level
    lr: float = 5e-4
    batch_size: int = 8  # crops per stage step
    every: int = 1  # one stage step every this many generator optimizer steps
    ema_decay: float = 0.995
    steps: int = 12  # sampling steps at generation
    sampler: str = "dpmsolver++"

    def __post_init__(self) -> None:
        _check(self.scale in (2, 4), "sr.scale must be 2 or 4")
        levels = len(self.block_channels)
        _check(levels >= 1 and len(self.attention) == levels, "sr.attention needs one entry per level")
        _check(
            all(c >= 8 and c % 8 == 0 for c in self.block_channels),
            "sr.block_channels must be multiples of 8",
        )
        unit = self.patch_size * 2 ** (levels - 1)
        _check(self.crop >= unit and self.crop % unit == 0, f"sr.crop must be a multiple of {unit}")
        _check(self.crop % self.scale == 0, "sr.crop must be a multiple of sr.scale")
        _check(
            self.prediction_type in ("v_prediction", "sample", "epsilon"),
            "sr.prediction_type must be v_prediction, sample or epsilon",
        )
        _check(self.noise_shift > 0 and self.min_snr_gamma >= 0, "sr.noise_shift must be positive")
        _check(
            0 <= self.cond_noise <= 1 and 0 <= self.cond_noise_max <= 1, "sr.cond_noise levels are in [0, 1]"
        )
        _check(
            self.lr > 0 and self.batch_size >= 1 and self.every >= 1,
            "sr.lr, batch_size, every must be positive",
        )
        _check(0 <= self.ema_decay < 1 and self.steps >= 1, "sr.ema_decay must be in [0, 1), sr.steps ≥ 1")


# --- the run's budgets --------------------------------------------------------------------------------
AUTO = "auto"
OS_RESERVE_GB = 1.6  # the original's reserve for the OS on its 16-GB machine (14.4 GB for the run)
MAX_AUTO_WORKERS = 8  # the original's DataLoader workers; more only add start-up time and RAM


def this_machine() -> tuple[float, int]:
    """(RAM in GB, the cores this process may use)."""
    import os

    import psutil

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return psutil.virtual_memory().total / 2**30, cores


def machine_budgets(ram_gb: float, cores: int) -> dict[str, float | int]:
    """The budgets ``auto`` stands for on a machine with ``ram_gb`` GB and ``cores`` cores: RAM less the
    OS's share (1.6 GB or a tenth, whichever is more: 14.4 of 16 GB, as the original), every core for
    torch's threads, and workers for the cores the main process leaves (up to 8)."""
    return {
        "max_ram_gb": round(max(ram_gb - max(OS_RESERVE_GB, 0.1 * ram_gb), 0.5 * ram_gb), 1),
        "cpu_threads": max(1, cores),
        "loader_workers": max(0, min(MAX_AUTO_WORKERS, cores - 2)),
    }


@dataclass
class ResourceConfig:
    """The run's device and budgets. ``auto`` (the default) sizes a budget from the machine the run finds
    (``machine_budgets``), so the same profile fits a 16-GB desktop and a 128-GB server; a number pins it."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_ram_gb: float | str = AUTO  # the process's RAM budget (the resource manager cleans up near it)
    max_vram_gb: float = 11.4  # 12 GB - 0.6 GB reserve (a larger card: moas.device.choose_profile)
    cpu_threads: int | str = AUTO  # torch intra-op threads (capped at the machine's cores)
    # On the CPU, use fewer threads while other processes hold cores (moas.train.threads): spinning OpenMP
    # threads on a shared core make a step ~3x slower. Off: the thread count never changes.
    adapt_threads: bool = True
    loader_workers: int | str = AUTO  # upper bound for DataLoader workers (0: load in the main process)

    def __post_init__(self) -> None:
        auto = [k for k in ("max_ram_gb", "cpu_threads", "loader_workers") if getattr(self, k) == AUTO]
        found = machine_budgets(*this_machine()) if auto else {}
        for key, kind in (("max_ram_gb", float), ("cpu_threads", int), ("loader_workers", int)):
            value = getattr(self, key)
            try:
                setattr(self, key, found[key] if key in auto else kind(value))
            except (TypeError, ValueError):
                raise ConfigError(f'resources.{key} must be a number or "auto", got {value!r}.') from None
        self.from_machine = tuple(auto)  # not a field: the saved config holds the numbers used
        _check(self.max_ram_gb >= 0, "resources.max_ram_gb must be 0 or more")
        _check(self.cpu_threads >= 1, "resources.cpu_threads must be at least 1")
        _check(self.loader_workers >= 0, "resources.loader_workers must be 0 or more")

    def describe(self) -> str:
        """The budgets, and which came from this machine."""
        text = f"RAM {self.max_ram_gb:g} GB, {self.cpu_threads} threads, {self.loader_workers} loader workers"
        return text + (
            f" ({', '.join(self.from_machine)} sized to this machine)" if self.from_machine else ""
        )
