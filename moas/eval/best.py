"""Best-step selection: keep the model file of the checkpoint with the highest model-quality score.

The score (higher is better) is, in this order of preference:

1. ``demo_accuracy``: on the demo data, the held-out attribute accuracy of ``moas eval`` (on a
   two-character set its held-out binding mean, ``moas.eval.validate``);
2. ``folder_score``: on user data, tag adherence and KID of images drawn from held-out captions, measured
   by the folder's own tag model (``moas.eval.folder_score``);
3. ``prompt_adherence``: without a tag model, the diffusion-classifier prompt adherence on the validation
   images;
4. ``ssim``: when no image has a usable caption, the validation SSIM of the predicted x0.

Never the training loss. A tie goes to the lower validation loss (then to the earlier checkpoint): the
coarser scores tie often — prompt adherence on a dozen validation images moves in steps of 1/12 — and on a
real folder of 238 paintings "earlier on a tie" kept a checkpoint whose samples were visibly noisier than
the next one's at the same adherence (``bench/realfolder.py``). A checkpoint whose samples copy training images
(``memorised`` above ``memorisation_limit``: nearest / second-nearest training image < 1/3, Gu et al.
2025; counted above the rate at which the same rule flags real held-out images, ``memorised_excess``, when
the folder evaluation measures it) is never chosen, however it scores: on a few thousand images a model that memorises looks best by
every distance to the training set just before it stops being useful. The history of every scored checkpoint is
written to ``<run>/best_steps.json``; when nothing can be scored (no validation images, no demo
manifest) the newest checkpoint is kept and the history says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from moas.inference.model_card import save_model
from moas.inference.model_file import ModelFile, model_file_path
from moas.io import atomic_write_bytes

log = logging.getLogger(__name__)

SCORE_PREFERENCE = ("demo_accuracy", "folder_score", "prompt_adherence", "ssim")
HISTORY_FILE = "best_steps.json"


def model_quality_score(metrics: dict[str, float | None]) -> tuple[float | None, str | None]:
    """The first available score of ``SCORE_PREFERENCE`` and its name, or (None, None)."""
    for name in SCORE_PREFERENCE:
        v = metrics.get(name)
        if v is not None:
            return float(v), name
    return None, None


def _beats(score: float, metrics: dict[str, float | None], best: dict) -> bool:
    """A higher score, or the same score at a lower validation loss."""
    if score != best["score"]:
        return score > best["score"]
    loss, best_loss = metrics.get("loss"), best.get("loss")
    return loss is not None and best_loss is not None and loss < best_loss


class BestModelKeeper:
    """Writes ``save_path`` whenever a checkpoint beats the best score so far; records the history."""

    def __init__(self, run_dir: Path, save_path: Path, memorisation_limit: float = 1.0) -> None:
        self.path = Path(run_dir) / HISTORY_FILE
        self.memorisation_limit = memorisation_limit
        self.save_path = model_file_path(save_path)
        self.history: list[dict] = []
        self.best: dict | None = None
        self.metric: str | None = None
        if self.path.is_file():  # a resumed run continues its history
            try:
                data = json.loads(self.path.read_text())
                self.history, self.best, self.metric = data["history"], data["best"], data["metric"]
            except (OSError, ValueError, KeyError):
                log.warning("%s is unreadable; best-step history starts again.", self.path)

    @property
    def best_score(self) -> float | None:
        return None if self.best is None else self.best.get("score")

    def update(
        self, epoch: int, step: int, metrics: dict[str, float | None], model_file: Callable[[], ModelFile]
    ) -> bool:
        """Score one checkpoint; save the model file when it is the best. Returns True when saved."""
        score, name = model_quality_score(metrics)
        if name is not None and self.metric is not None and name != self.metric:
            # The same run always measures the same things, so this only happens when data changed.
            log.warning(
                "Best-step metric changed from %s to %s; comparing by %s from now on.",
                self.metric,
                name,
                name,
            )
            self.best = None
        self.metric = name or self.metric
        entry = {
            "epoch": epoch,
            "global_step": step,
            "score": score,
            "metric": name,
            **{k: v for k, v in metrics.items() if v is not None},
        }
        memorised = metrics.get("memorised_excess")
        memorised = metrics.get("memorised") if memorised is None else memorised
        vetoed = memorised is not None and memorised > self.memorisation_limit
        entry["vetoed"] = vetoed
        self.history.append(entry)
        if vetoed:
            log.warning(
                "Checkpoint of epoch %d not eligible as the best model: %.0f%% of its samples copy a "
                "training image (limit %.0f%%).",
                epoch,
                100 * memorised,
                100 * self.memorisation_limit,
            )
            improved = False
        elif score is None:
            improved = self.best is None or self.best.get("score") is None
        else:
            improved = (
                self.best is None or self.best.get("score") is None or _beats(score, metrics, self.best)
            )
        if improved:
            self.best = entry
            contents = model_file()
            contents.provenance |= {"score": score, "metric": name}
            if metrics.get("folder_reliable") is not None:  # the folder evaluator's own quality, for the card
                contents.provenance |= {
                    "evaluator_f1": metrics.get("tagger_f1"),
                    "evaluator_reliable": bool(metrics["folder_reliable"]),
                }
            save_model(self.save_path, contents)
            if score is None:
                log.info("No validation score available; kept the newest model as %s.", self.save_path)
            else:
                log.info("New best model (%s %.4f) at epoch %d → %s.", name, score, epoch, self.save_path)
        self._write()
        return improved

    def _write(self) -> None:
        data = {"metric": self.metric, "best": self.best, "history": self.history}
        atomic_write_bytes(self.path, json.dumps(data, indent=2).encode())
