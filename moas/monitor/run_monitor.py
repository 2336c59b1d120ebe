"""Run monitoring: TensorBoard, the metrics history, validation at checkpoints, the best model, sample grids.

Everything goes under the run folder ``runs/NNN-profile/`` (``tensorboard --logdir runs/``). Only rank 0
writes (``torch.distributed``); on other ranks every method returns at once. TensorBoard tags:

* ``loss/total`` and ``loss/<term>`` for every term the training step reports;
* ``expert/{line_art,color,background}`` and ``art_theory/{anatomy,perspective,color_harmony}``:
  measurements of the predicted x0 against the real x0 (``moas.eval.metrics``), on the training batch;
  ``val/expert/*`` and ``val/art_theory/*`` the same on the validation images at fixed timesteps;
* ``lr`` (group 0) and ``lr/<group>`` per parameter group; ``train/grad_norm``;
* ``perf/images_per_sec``, ``perf/step_time_s``, ``perf/data_wait_s``; ``system/ram_gb``,
  ``system/ram_percent``, ``system/vram_gb``, ``system/vram_peak_gb`` (CUDA only);
* ``val/loss``, ``val/psnr``, ``val/ssim``, ``val/accuracy``, ``val/prompt_adherence``,
  ``val/demo_accuracy``, and ``val/<metric>_avg`` (ValidationMetrics' running averages);
* ``best/score``: the model-quality score used for best-step selection;
* ``eval/self_critique`` and ``eval/creativity`` (see ``moas.eval.quality``), ``eval/quality/<part>``;
* images ``samples`` (fixed prompts and seeds); histograms ``hist/timesteps``, ``hist/sample_loss``
  and ``brain/<output>`` for every conditioning output (routing/emotion once the brain has them);
* text ``config`` (the resolved config) and ``sample_prompts``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image

from moas.config import DiffusionConfig, SampleConfig
from moas.eval.metrics import ValidationMetrics, art_measurements
from moas.eval.quality import QUALITY_PARTS, creativity, quality_parts
from moas.inference.pipeline import Pipeline
from moas.inference.prompt_file import SamplePrompt
from moas.monitor.dashboard import Dashboard
from moas.monitor.health import LossHealth
from moas.monitor.progress import TrainingHistory, visualize_training_progress
from moas.text.encoder import TextEncoder
from moas.text.inputs import caption_inputs

log = logging.getLogger(__name__)
perf_log = logging.getLogger("moas.performance")

STEP_NAMES = {
    "loss": "loss/total",
    "lr": "lr",
    "images_per_sec": "perf/images_per_sec",
    "step_time": "perf/step_time_s",
    "data_time": "perf/data_wait_s",
    "grad_norm": "train/grad_norm",
    "val_loss": "val/loss",
}
CREATIVITY_SEED = 10_000  # seeds of the creativity samples: CREATIVITY_SEED + i


def is_rank0() -> bool:
    """True unless this is a non-zero rank of an initialised torch.distributed group."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def pick_sample_prompts(captions: list[str], n: int = 8) -> list[str]:
    """Up to ``n`` distinct non-empty captions, spread over the (sorted) set so the choice is stable."""
    distinct = sorted({c for c in captions if c})
    if not distinct:
        return ["1girl, solo"] * min(n, 4)
    step = max(1, len(distinct) // n)
    return distinct[::step][:n]


def memory_stats(device: torch.device | None = None) -> dict[str, float]:
    """Process RAM (GB), system RAM use (%), and CUDA memory (GB) when on a GPU."""
    out = {
        "system/ram_gb": psutil.Process().memory_info().rss / 1e9,
        "system/ram_percent": psutil.virtual_memory().percent,
    }
    if device is not None and device.type == "cuda":
        out["system/vram_gb"] = torch.cuda.memory_allocated(device) / 1e9
        out["system/vram_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


class RunMonitor:
    """TensorBoard writer + metrics history + dashboard + validation/best-model bookkeeping of one run.

    ``history`` (a ``TrainingHistory``) and ``dashboard`` make it an ``ai_system`` for
    ``visualize_training_progress`` and ``print_progress_dashboard``.
    """

    def __init__(
        self,
        run_dir: Path,
        config_toml: str,
        captions: list[str],
        encoder: TextEncoder,
        log_every: int = 1,
        *,
        sample: SampleConfig,
        diffusion: DiffusionConfig,
        creativity_samples: int = 4,
        sample_prompts: list[SamplePrompt] | None = None,
        validator=None,
        keeper=None,
        dashboard: Dashboard | None = None,
        measure_every: int = 10,
        device: torch.device | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.sample, self.diffusion, self.creativity_samples = sample, diffusion, creativity_samples
        self.enabled = is_rank0()
        self.encoder = encoder
        self.log_every = log_every
        self.measure_every = measure_every
        self.device = device
        self.validator = validator
        self.keeper = keeper
        self.dashboard = dashboard or Dashboard(enabled=False)
        self.history = TrainingHistory()
        self.val_metrics = ValidationMetrics()
        self.health = LossHealth()
        self.sample_prompts = sample_prompts or [SamplePrompt(p) for p in pick_sample_prompts(captions)]
        self.prompts = [sp.prompt for sp in self.sample_prompts]
        self.writer = SummaryWriter(str(self.run_dir)) if self.enabled else None
        if self.writer is not None:
            self.writer.add_text("config", "```toml\n" + config_toml + "\n```", 0)
            self.writer.add_text("sample_prompts", "\n\n".join(self.prompts), 0)

    # -- scalars -------------------------------------------------------------------------------------------
    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is None or value is None:
            return
        self.writer.add_scalar(name, value, step)
        self.history.add(step, name, value)

    def log_step(
        self,
        step: int,
        losses: dict[str, float] | None = None,
        lrs: dict[str, float] | None = None,
        **scalars: float,
    ) -> None:
        """Log one optimizer step: ``losses`` (term → value; ``total`` or ``loss=`` is loss/total),
        ``lrs`` (parameter group → lr) and named scalars (``STEP_NAMES`` or full tag names)."""
        if self.writer is None:
            return
        self.history.status["step"] = step
        if step % self.log_every == 0:
            for term, v in (losses or {}).items():
                self.scalar("loss/total" if term == "total" else f"loss/{term}", float(v), step)
            for group, v in (lrs or {}).items():
                self.scalar(f"lr/{group}", float(v), step)
            for k, v in scalars.items():
                self.scalar(STEP_NAMES.get(k, k), float(v), step)
            if step % self.measure_every == 0 or step == 1:
                for k, v in memory_stats(self.device).items():
                    self.scalar(k, v, step)
            perf_log.debug("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
        self.dashboard.show(self.history)

    def log_brain(self, step: int, model) -> None:
        """Histograms of routing weights per expert and of emotion scores, per-expert stats and expert-target
        losses (moas brain)."""
        model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        moe = model.stage("moe") if hasattr(model, "stage") else None
        if moe is not None:
            rows = moe.recent_routing(getattr(self, "_routing_seen", 0))  # (N, 14) since the last call
            self._routing_seen = moe.routing_calls
            for i, name in enumerate(moe.names):
                if len(rows):
                    self.writer.add_histogram(f"routing/{name}", rows[:, i], step)
                for k, v in moe.expert_stats()[name].items():
                    self.writer.add_scalar(f"experts/{name}/{k}", v, step)
            self.writer.add_scalar("experts/temperature", float(moe.temperature.detach()), step)
        heads = model.stage("aux_targets") if moe is not None else None
        if heads is not None:  # brain.aux_targets: each expert head's mean loss since the last epoch
            for name, v in heads.take_means().items():
                self.writer.add_scalar(f"aux_targets/{name}", v, step)
        emotion = model.stage("emotion") if moe is not None else None
        if emotion is not None and emotion.score_history:
            from moas.models.understanding import EMOTIONS

            scores = torch.stack(list(emotion.score_history)).cpu()  # (N, 10)
            for i, name in enumerate(EMOTIONS):
                self.writer.add_histogram(f"emotion/{name}", scores[:, i], step)
                self.writer.add_scalar(f"emotion_mean/{name}", float(scores[:, i].mean()), step)

    def measures(self, step: int) -> bool:
        """True when ``observe_batch`` at ``step`` measures (so the step computes what it needs)."""
        return self.writer is not None and (step % self.measure_every == 0 or step == 1)

    @torch.no_grad()
    def observe_batch(
        self,
        step: int,
        x0: torch.Tensor,
        x0_pred: torch.Tensor,
        t: torch.Tensor | None = None,
        per_sample_loss: torch.Tensor | None = None,
    ) -> None:
        """Every ``measure_every`` steps: per-expert/art-theory measurements and histograms of a batch."""
        if not self.measures(step):
            return
        for k, v in art_measurements(x0_pred.detach().float(), x0.float()).items():
            self.scalar(k, v, step)
        if t is not None:
            self.writer.add_histogram("hist/timesteps", t.detach().cpu(), step)
        if per_sample_loss is not None:
            self.writer.add_histogram("hist/sample_loss", per_sample_loss.detach().float().cpu(), step)

    def log_histograms(self, step: int, tensors: dict[str, torch.Tensor], prefix: str = "brain") -> None:
        """One histogram per tensor (e.g. the brain's routing weights or emotion scores)."""
        if self.writer is None:
            return
        for name, v in tensors.items():
            if isinstance(v, torch.Tensor) and v.numel() and v.is_floating_point():
                self.writer.add_histogram(f"{prefix}/{name}", v.detach().float().cpu(), step)

    def set_status(self, **status) -> None:
        self.history.status.update(status)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def on_checkpoint(
        self, epoch: int, step: int, model: torch.nn.Module, model_state: Callable[[], dict]
    ) -> dict:
        """Validate ``model`` (the EMA weights), log it, keep the best model file, draw progress.png."""
        if not self.enabled:
            return {}
        was_training = model.training
        metrics = self.validator.run(model, self.encoder) if self.validator is not None else {}
        self._brain_histograms(model, step)
        model.train(was_training)
        self.val_metrics.update(**{k: v for k, v in metrics.items() if k in ("psnr", "ssim", "accuracy")})
        for k, v in metrics.items():
            if v is not None:
                self.scalar(k if k.startswith("val/") else f"val/{k}", v, step)
        for k in ("psnr", "ssim", "accuracy"):
            avg = self.val_metrics.average(k)
            if avg is not None:
                self.scalar(f"val/{k}_avg", avg, step)
        if self.keeper is not None:
            self.keeper.update(epoch, step, metrics, model_state)
            best = self.keeper.best or {}
            if self.keeper.history[-1].get("score") is not None:
                self.scalar("best/score", self.keeper.history[-1]["score"], step)
            self.set_status(
                best_score=best.get("score"), best_metric=best.get("metric"), best_epoch=best.get("epoch")
            )
        if metrics:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v is not None and "/" not in k)
            log.info("Validation (EMA weights) after epoch %d: %s.", epoch, shown)
            problem = self.health.check(epoch, metrics.get("loss"), metrics.get("loss_vs_zero"))
            if problem:
                log.warning(problem)
        visualize_training_progress(self, self.run_dir / "progress.png")
        self.dashboard.show(self.history, force=True)
        self.writer.flush()
        return metrics

    @torch.no_grad()
    def _brain_histograms(self, model: torch.nn.Module, step: int) -> None:
        condition = getattr(model, "condition", None)
        if condition is None or self.device is None:
            return
        out = condition(caption_inputs(self.encoder, self.prompts, self.device))
        self.log_histograms(step, {k: v for k, v in out.items() if k not in ("context", "context_mask")})

    # -- sample grids --------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, model, epoch: int, step: int, device: torch.device) -> Path | None:
        """Render the fixed prompts with fixed seeds (EMA weights) into TensorBoard and ``samples/``;
        log the self-critique (quality of these images) and creativity (diversity over seeds) scores."""
        if self.writer is None:
            return None
        sc = self.sample
        pipe = Pipeline(model, self.encoder, self.diffusion, device)
        images: list[torch.Tensor | None] = [None] * len(self.sample_prompts)
        groups: dict[tuple, list[int]] = {}
        for i, sp in enumerate(self.sample_prompts):
            key = (
                sp.steps or sc.steps,
                sc.guidance_scale if sp.scale is None else sp.scale,
                sc.negative_prompt if sp.negative is None else sp.negative,
            )
            groups.setdefault(key, []).append(i)
        for (steps, scale, negative), idx in groups.items():
            out = pipe(
                [self.sample_prompts[i].prompt for i in idx],
                seeds=[
                    i if self.sample_prompts[i].seed is None else self.sample_prompts[i].seed for i in idx
                ],
                negative_prompt=negative,
                steps=steps,
                guidance_scale=scale,
                sampler=sc.sampler,
            )
            for i, img in zip(idx, out, strict=True):
                images[i] = img
        batch = torch.stack(images)  # (N, 3, H, W) uint8
        parts = quality_parts(batch)
        for name in QUALITY_PARTS:
            self.scalar(f"eval/quality/{name}", float(parts[name].mean()), step)
        self.scalar("eval/self_critique", float(torch.stack([parts[k] for k in QUALITY_PARTS]).mean()), step)
        n = max(2, self.creativity_samples)
        first = self.sample_prompts[0]
        variety = pipe(
            [first.prompt] * n,
            seeds=[CREATIVITY_SEED + i for i in range(n)],
            negative_prompt=sc.negative_prompt if first.negative is None else first.negative,
            steps=first.steps or sc.steps,
            guidance_scale=sc.guidance_scale if first.scale is None else first.scale,
            sampler=sc.sampler,
        )
        self.scalar("eval/creativity", creativity(variety), step)
        grid = make_grid(batch.float() / 255.0, nrow=min(4, len(batch)), padding=1)  # (3, H', W')
        self.writer.add_image("samples", grid, step)
        self.writer.flush()
        out = self.run_dir / "samples" / f"epoch_{epoch:04d}.png"
        out.parent.mkdir(exist_ok=True)
        save_image(grid, out)
        return out

    def close(self) -> None:
        self.dashboard.show(
            self.history, force=True
        )  # the final state, even if the last redraw was throttled
        self.dashboard.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
