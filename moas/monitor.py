"""Run monitoring: TensorBoard scalars, the resolved config, fixed-seed sample grids, performance log.

Everything goes under the run folder ``runs/NNN-profile/`` (``tensorboard --logdir runs/``). Sample grids
use fixed prompts and seeds so runs can be compared epoch by epoch; each grid is also saved as a PNG.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid, save_image

from moas.config import MoasConfig
from moas.pipeline import Pipeline
from moas.text import TextEncoder

log = logging.getLogger(__name__)
perf_log = logging.getLogger("moas.performance")


def pick_sample_prompts(captions: list[str], n: int = 8) -> list[str]:
    """Up to ``n`` distinct non-empty captions, spread over the (sorted) set so the choice is stable."""
    distinct = sorted({c for c in captions if c})
    if not distinct:
        return ["1girl, solo"] * min(n, 4)
    step = max(1, len(distinct) // n)
    return distinct[::step][:n]


class RunMonitor:
    def __init__(
        self,
        run_dir: Path,
        cfg: MoasConfig,
        captions: list[str],
        encoder: TextEncoder,
        log_every: int = 1,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.writer = SummaryWriter(str(self.run_dir))
        self.writer.add_text("config", "```toml\n" + cfg.to_toml() + "\n```", 0)
        self.prompts = pick_sample_prompts(captions)
        self.writer.add_text("sample_prompts", "\n\n".join(self.prompts), 0)
        self.encoder = encoder
        self.log_every = log_every

    def log_step(self, step: int, **scalars: float) -> None:
        if step % self.log_every:
            return
        names = {
            "loss": "loss/total",
            "lr": "lr",
            "images_per_sec": "perf/images_per_sec",
            "step_time": "perf/step_time_s",
            "data_time": "perf/data_wait_s",
            "grad_norm": "train/grad_norm",
            "val_loss": "val/loss",
        }
        for k, v in scalars.items():
            self.writer.add_scalar(names.get(k, k), v, step)
        perf_log.debug("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def log_brain(self, step: int, model) -> None:
        """Histograms of routing weights per expert and of emotion scores, per-expert stats (moas brain)."""
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
        emotion = model.stage("emotion") if moe is not None else None
        if emotion is not None and emotion.score_history:
            from moas.models.understanding import EMOTIONS

            scores = torch.stack(list(emotion.score_history))  # (N, 10)
            for i, name in enumerate(EMOTIONS):
                self.writer.add_histogram(f"emotion/{name}", scores[:, i], step)
                self.writer.add_scalar(f"emotion_mean/{name}", float(scores[:, i].mean()), step)

    @torch.no_grad()
    def sample_grid(self, model, epoch: int, step: int, device: torch.device) -> Path:
        """Render the fixed prompts with fixed seeds (EMA weights) into TensorBoard and ``samples/``."""
        sc = self.cfg.sample
        pipe = Pipeline(model, self.encoder, self.cfg.diffusion, device)
        images = pipe(
            self.prompts,
            seeds=list(range(len(self.prompts))),
            negative_prompt=sc.negative_prompt,
            steps=sc.steps,
            guidance_scale=sc.guidance_scale,
            sampler=sc.sampler,
        )
        grid = make_grid(images.float() / 255.0, nrow=min(4, len(images)), padding=1)  # (3, H', W')
        self.writer.add_image("samples", grid, step)
        self.writer.flush()
        out = self.run_dir / "samples" / f"epoch_{epoch:04d}.png"
        out.parent.mkdir(exist_ok=True)
        save_image(grid, out)
        return out

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
