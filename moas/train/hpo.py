"""AutomaticHyperparameterOptimizer and ``moas tune``: short trainings with sampled hyperparameters.

Search space (the original's): lr log-uniform 1e-5–1e-3, batch size 2/4/8/16, weight decay log-uniform
1e-6–1e-4, beta1 0.85–0.95, beta2 0.99–0.9999, dropout 0–0.3 (only when the model config has a
``dropout`` field; today's U-Net has none, so it is reported as not searched). The first 5 trials are
random; later trials start from the score-weighted average of the best 5 (weights 1/rank, log-scale
parameters averaged in log space) and perturb each parameter by ±15 % when the top 5 disagree on it
(coefficient of variation > 0.25) or ±5 % when they agree — explore where unsure, refine where settled.

Each trial is a ``max_steps`` training in its own folder under ``--out`` and is scored by the validation
loss of its EMA weights (fixed timesteps and noise; ``moas.eval.validate``) on ``--val_dir``, or on the
training images when no validation folder is given (then the score measures fit, not generalisation).
The results table goes to ``tune_results.json`` and the console; the best settings become a TOML
profile (``configs/tuned.toml`` by default) usable with ``moas train --config``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moas.config import MoasConfig, ModelConfig, dict_to_toml
from moas.errors import ConfigError, MoasError
from moas.io import atomic_write_bytes

log = logging.getLogger(__name__)

BATCH_CHOICES = (2, 4, 8, 16)
# name → (low, high, log scale)
CONTINUOUS = {
    "lr": (1e-5, 1e-3, True),
    "weight_decay": (1e-6, 1e-4, True),
    "beta1": (0.85, 0.95, False),
    "beta2": (0.99, 0.9999, False),
    "dropout": (0.0, 0.3, False),
}
EXPLORE_TRIALS = 5
TOP_K = 5
HIGH_VARIANCE_CV = 0.25


@dataclass
class Trial:
    number: int
    params: dict[str, float]
    score: float = math.nan
    seconds: float = 0.0
    status: str = "ok"


@dataclass
class AutomaticHyperparameterOptimizer:
    seed: int = 0
    search_dropout: bool = False
    trials: list[Trial] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @property
    def names(self) -> list[str]:
        return [n for n in CONTINUOUS if n != "dropout" or self.search_dropout]

    def _random(self) -> dict[str, float]:
        out: dict[str, float] = {"batch_size": self.rng.choice(BATCH_CHOICES)}
        for n in self.names:
            lo, hi, log_scale = CONTINUOUS[n]
            out[n] = (
                math.exp(self.rng.uniform(math.log(lo), math.log(hi)))
                if log_scale
                else self.rng.uniform(lo, hi)
            )
        return out

    def suggest(self) -> dict[str, float]:
        done = sorted((t for t in self.trials if math.isfinite(t.score)), key=lambda t: t.score)
        if len(self.trials) < EXPLORE_TRIALS or not done:
            return self._random()
        top = done[:TOP_K]
        weights = [1.0 / (i + 1) for i in range(len(top))]
        total = sum(weights)
        out: dict[str, float] = {}
        for n in self.names:
            lo, hi, log_scale = CONTINUOUS[n]
            vals = [t.params[n] for t in top]
            xs = [math.log(v) for v in vals] if log_scale else vals
            centre = sum(w * x for w, x in zip(weights, xs, strict=True)) / total
            spread = statistics.pstdev(vals) / max(abs(statistics.fmean(vals)), 1e-12)
            p = 0.15 if spread > HIGH_VARIANCE_CV else 0.05
            value = (math.exp(centre) if log_scale else centre) * self.rng.uniform(1 - p, 1 + p)
            out[n] = min(hi, max(lo, value))
        bs = sum(w * math.log2(t.params["batch_size"]) for w, t in zip(weights, top, strict=True)) / total
        bs_spread = statistics.pstdev([t.params["batch_size"] for t in top]) > 0
        if (
            bs_spread and self.rng.random() < 0.3
        ):  # the batch size is discrete: occasionally step to a neighbour
            bs += self.rng.choice((-1, 1))
        out["batch_size"] = min(BATCH_CHOICES, key=lambda c: abs(math.log2(c) - bs))
        return out

    def report(self, trial: Trial) -> None:
        self.trials.append(trial)

    def best(self) -> Trial | None:
        done = [t for t in self.trials if math.isfinite(t.score)]
        return min(done, key=lambda t: t.score) if done else None


def apply_params(cfg: MoasConfig, params: dict[str, float]) -> MoasConfig:
    d = cfg.to_dict()
    d["train"]["lr"] = params["lr"]
    d["train"]["batch_size"] = int(params["batch_size"])
    d["train"]["weight_decay"] = params["weight_decay"]
    d["train"]["betas"] = [params["beta1"], params["beta2"]]
    if "dropout" in params:
        d["model"]["dropout"] = params["dropout"]
    return MoasConfig.from_dict(d)


def run_trial(cfg: MoasConfig, params: dict[str, float], folder: Path, steps: int, progress: bool) -> float:
    """Train ``steps`` optimizer steps with ``params`` in ``folder``; return the validation loss."""
    from moas.eval.validate import validation_loss
    from moas.train.loop import build_trainer

    t_cfg = apply_params(cfg, params)
    tc = t_cfg.train
    tc.max_steps, tc.auto_resume, tc.sample_every, tc.save_every = steps, False, 0, 10**6
    # Fit the whole warm-up + cosine schedule into the trial, so short trials are not all warm-up.
    from moas.data.images import scan_image_files

    n_images = len(scan_image_files(Path(t_cfg.data.data_dir)))
    steps_per_epoch = max(1, (n_images // max(1, min(tc.batch_size, n_images))) // tc.grad_accum_steps)
    tc.epochs = max(1, math.ceil(steps / steps_per_epoch))
    tc.checkpoint_dir, tc.run_dir = str(folder / "checkpoints"), str(folder / "runs")
    tc.save_path, tc.log_dir = str(folder / "model.pt"), str(folder / "logs")
    trainer = build_trainer(t_cfg, progress=progress)
    trainer.run()
    data = trainer.data
    return validation_loss(
        trainer.parts.ema.model,
        data.val_set or data.dataset,
        data.bank,
        trainer.objective,
        trainer.device,
        trainer.state.micro_batch,
        tc.seed,
    )


def tune(
    cfg: MoasConfig,
    trials: int,
    budget_minutes: float,
    steps: int,
    out_dir: str | Path,
    best_config: str | Path,
    seed: int = 0,
    progress: bool = False,
) -> AutomaticHyperparameterOptimizer:
    if trials < 1 or steps < 1 or budget_minutes <= 0:
        raise ConfigError("--trials and --steps must be at least 1 and --budget_minutes positive.")
    search_dropout = "dropout" in {f.name for f in dataclasses.fields(ModelConfig)}
    if not search_dropout:
        log.info("dropout: the model has no dropout setting, so it is not searched.")
    opt = AutomaticHyperparameterOptimizer(seed=seed, search_dropout=search_dropout)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_end = time.monotonic() + budget_minutes * 60
    for n in range(trials):
        if time.monotonic() >= t_end:
            log.info("Budget of %.1f minutes used after %d trials.", budget_minutes, n)
            break
        params = opt.suggest()
        t0 = time.monotonic()
        trial = Trial(n, params)
        try:
            trial.score = run_trial(cfg, params, out / f"trial_{n:03d}", steps, progress)
        except (
            MoasError
        ) as exc:  # e.g. out of memory at the minimum batch: a failed trial, not a failed search
            trial.status = f"failed: {exc}"
        trial.seconds = time.monotonic() - t0
        opt.report(trial)
        log.info("Trial %d: score %.5f (%s) %s", n, trial.score, trial.status, fmt_params(params))
        write_results(opt, out / "tune_results.json")
    best = opt.best()
    if best is None:
        raise MoasError("No tuning trial finished; see the log for each trial's error.")
    best_cfg = apply_params(cfg, best.params)
    header = f"# moas tune: best of {len(opt.trials)} trials (score {best.score:.5f}, validation loss).\n"
    Path(best_config).parent.mkdir(parents=True, exist_ok=True)
    tuned = {
        "train": {
            k: v
            for k, v in best_cfg.to_dict()["train"].items()
            if k in ("lr", "batch_size", "weight_decay", "betas")
        }
    }
    if search_dropout:
        tuned["model"] = {"dropout": best.params["dropout"]}
    atomic_write_bytes(best_config, (header + dict_to_toml(tuned)).encode())
    return opt


def fmt_params(p: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


def write_results(opt: AutomaticHyperparameterOptimizer, path: Path) -> None:
    rows = [dataclasses.asdict(t) for t in opt.trials]
    atomic_write_bytes(path, json.dumps(rows, indent=2).encode())


def results_table(opt: AutomaticHyperparameterOptimizer) -> str:
    names = ["batch_size", *opt.names]
    lines = ["trial  score     seconds  " + "  ".join(f"{n:>12}" for n in names)]
    for t in sorted(opt.trials, key=lambda t: (not math.isfinite(t.score), t.score)):
        vals = "  ".join(f"{t.params[n]:>12.4g}" for n in names)
        lines.append(
            f"{t.number:>5}  {t.score:<8.5f}  {t.seconds:>7.1f}  {vals}  {'' if t.status == 'ok' else t.status}"
        )
    return "\n".join(lines)
