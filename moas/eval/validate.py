"""Validation: the held-out split, and what the EMA model scores on it at every checkpoint.

Validation images come from ``--val_dir`` or, without one, from a slice of the training folder chosen by
the seed and excluded from training (``train.val_fraction``; none when the folder has fewer than
``train.val_min_images`` images). At each checkpoint the EMA model is measured on them:

* ``loss``: the weighted diffusion loss at fixed timesteps and fixed noise (seeded), comparable across
  epochs and runs;
* ``loss_vs_zero``: ``loss`` as a share of the loss of a model that predicts zeros on the same images,
  steps and noise (1 = the model has learned nothing; ``moas.monitor.health`` warns on it);
* ``psnr`` / ``ssim``: the model's predicted x0 against the real image at the same fixed timesteps;
* the six per-expert / art-theory measurements of ``moas.eval.metrics`` on the same predictions;
* ``prompt_adherence``: the fraction of validation images whose own caption gives a lower denoising error
  than a mismatched caption (same timesteps and noise) — a diffusion-classifier test of whether the
  model uses the prompt. Images without a caption are not counted; ``None`` when no image counts.
* ``folder_adherence``, ``folder_kid``, ``memorised`` (+ ``_features`` / ``_pixels`` / ``_real`` /
  ``_excess``) and ``folder_score``:
  images drawn from the held-out captions, measured by the folder's own tag model
  (``moas.eval.folder_score``); absent when the folder's captions cannot train one;
* ``demo_accuracy``: on the demo data (a ``manifest.json`` beside the training folder) the held-out
  attribute accuracy of ``moas eval``. On a two-character demo set (``"scene": "two"``) it is the binding
  table's held-out ``mean`` instead: the accuracy of the four per-girl columns (left/right hair and eye
  colour) over the held-out (left hair, right hair) bindings. The mean rather than ``both_bound``
  because with ``eval_n`` images an all-or-nothing per-image score is 0 for every early checkpoint and
  cannot rank them, while the mean still rises as each colour lands on its side (a model that swaps the
  sides scores 0 on the hair columns either way); the background, which needs no binding, is left out;
* ``accuracy``: the demo accuracy on the demo data; on other data the prompt adherence.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from moas.config import DiffusionConfig, SampleConfig
from moas.data.dataset import ArtDataset, collate, to_model_range
from moas.data.sampler import BucketBatchSampler
from moas.diffusion.objective import DiffusionObjective
from moas.errors import DataError
from moas.eval.metrics import art_measurements, psnr, ssim
from moas.text.bank import TextBank
from moas.text.inputs import caption_inputs

log = logging.getLogger(__name__)

TIMESTEPS = (50, 250, 500, 750, 950)  # spread over the schedule; each image is scored at all of them
PSNR_TIMESTEPS = (50, 250)  # low/mid noise (of TIMESTEPS): where the predicted x0 should resemble the image


def split_holdout(
    dataset: ArtDataset, fraction: float, seed: int, min_images: int
) -> tuple[ArtDataset, ArtDataset | None]:
    """Split off a seed-fixed validation slice: ``max(1, round(fraction·n))`` images, none when n is small.

    The choice depends only on the sorted file list and the seed, so a resumed run holds out the same files.
    """
    n = len(dataset)
    if fraction <= 0 or n < min_images:
        return dataset, None
    k = min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    val_idx = set(order[:k])
    return _subset(dataset, [i for i in range(n) if i not in val_idx]), _subset(dataset, sorted(val_idx))


def _subset(dataset: ArtDataset, keep: list[int]) -> ArtDataset:
    """A shallow copy of ``dataset`` with only the images ``keep``: every per-image list is filtered."""
    n = len(dataset)
    out = copy.copy(dataset)
    for name, value in vars(dataset).items():
        if isinstance(value, list) and len(value) == n:  # paths, cache entries, buckets, captions, styles
            setattr(out, name, [value[i] for i in keep])
    out._ram, out._ram_used = {}, 0  # the RAM cache is keyed by index: each view needs its own
    return out


def join_subsets(a: ArtDataset, b: ArtDataset) -> tuple[ArtDataset, list[int], list[int]]:
    """One view of two disjoint splits of a folder (``a`` first) and the indices of each in it."""
    na, nb = len(a), len(b)
    out = copy.copy(a)
    for name, value in vars(a).items():
        other = getattr(b, name, None)
        if isinstance(value, list) and len(value) == na and isinstance(other, list) and len(other) == nb:
            setattr(out, name, value + other)
    out._ram, out._ram_used = {}, 0
    return out, list(range(na)), list(range(na, na + nb))


def find_demo_manifest(data_dir: str | Path) -> Path | None:
    """The demo data's ``manifest.json`` (in the folder or its parent), or None for user data."""
    base = Path(data_dir)
    for cand in (base / "manifest.json", base.parent / "manifest.json"):
        if cand.is_file():
            return cand
    return None


def _in_order(dataset: ArtDataset, batch_size: int) -> DataLoader:
    """Every image exactly once, in a fixed order; one image size per batch (aspect buckets)."""
    order = BucketBatchSampler(
        dataset.bucket_ids, [1.0] * len(dataset), batch_size, shuffle=False, fill=False
    )
    return DataLoader(dataset, batch_sampler=order, collate_fn=collate)


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    dataset: ArtDataset,
    bank: TextBank,
    objective: DiffusionObjective,
    device: torch.device,
    batch_size: int = 32,
    seed: int = 0,
) -> float:
    """The weighted diffusion loss at fixed timesteps and seeded noise (mean over images × timesteps)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in _in_order(dataset, batch_size):
        x0 = to_model_range(batch["pixels"]).to(device)  # (B, 3, H, W)
        text = caption_inputs(bank, batch["captions"], device)
        for step in TIMESTEPS:
            t = torch.full((x0.shape[0],), step, dtype=torch.long, device=device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            total += objective(model, x0, text, t, noise).weighted.sum().item()
            count += x0.shape[0]
    return total / max(count, 1)


def mismatched_captions(captions: list[str], pool: list[str], seed: int) -> list[str | None]:
    """For each caption a different non-empty caption from ``pool`` (fixed by seed); None if impossible."""
    pool = sorted({c for c in pool if c})
    out: list[str | None] = []
    for i, c in enumerate(captions):
        others = [p for p in pool if p != c]
        out.append(others[(seed + 31 * i) % len(others)] if c and others else None)
    return out


class Validator:
    """Measures a model on the validation images with fixed timesteps and noise (see the module doc)."""

    def __init__(
        self,
        dataset: ArtDataset | None,
        bank: TextBank,
        objective: DiffusionObjective,
        device: torch.device,
        seed: int,
        batch_size: int,
        caption_pool: list[str],
        demo_dir: Path | None = None,
        diffusion: DiffusionConfig | None = None,
        sample: SampleConfig | None = None,
        eval_n: int = 8,
        folder=None,
    ) -> None:
        self.dataset = dataset
        self.bank = bank
        self.objective = objective
        self.device = device
        self.seed = seed
        self.batch_size = batch_size
        self.caption_pool = caption_pool
        self.demo_dir = demo_dir
        self.diffusion = diffusion or DiffusionConfig()
        self.sample = sample or SampleConfig()
        self.eval_n = eval_n
        self.folder = folder  # moas.eval.folder_score.FolderScorer, or None

    @torch.no_grad()
    def _denoise_metrics(self, model: torch.nn.Module) -> dict[str, float | None]:
        gen = torch.Generator().manual_seed(self.seed)
        objective, schedule = self.objective, self.objective.schedule
        sums: dict[str, float] = {}
        n_img, wins, counted = 0, 0, 0
        captions = self.dataset.captions()
        wrong_all = mismatched_captions(captions, self.caption_pool, self.seed)
        for batch in _in_order(self.dataset, self.batch_size):
            x0 = to_model_range(batch["pixels"]).to(self.device)  # (B, 3, H, W)
            b = x0.shape[0]
            text = caption_inputs(self.bank, batch["captions"], self.device)
            wrong = [wrong_all[int(i)] for i in batch["index"]]
            has_wrong = torch.tensor([w is not None for w in wrong])
            wrong_text = caption_inputs(self.bank, [w or "" for w in wrong], self.device)
            err_true, err_wrong = torch.zeros(b), torch.zeros(b)
            for step in TIMESTEPS:
                t = torch.full((b,), step, dtype=torch.long, device=self.device)
                noise = torch.randn(x0.shape, generator=gen).to(self.device)
                out = objective(model, x0, text, t, noise)
                sums["loss"] = sums.get("loss", 0.0) + out.weighted.sum().item()
                # The same loss for a model that predicts zeros: the scale a collapsed run sits at.
                zero = schedule.target(x0, noise, t).float().pow(2).mean((1, 2, 3)) * schedule.loss_weight(t)
                sums["zero"] = sums.get("zero", 0.0) + zero.sum().item()
                err_true += out.per_sample.cpu()
                if has_wrong.any():  # the same image, step and noise under a caption of another image
                    err_wrong += objective(model, x0, wrong_text, t, noise).per_sample.cpu()
                if step in PSNR_TIMESTEPS:
                    x0_hat = out.x0(schedule).clamp(-1, 1)  # (B, 3, H, W)
                    sums["psnr"] = sums.get("psnr", 0.0) + psnr(x0_hat, x0).sum().item()
                    sums["ssim"] = sums.get("ssim", 0.0) + ssim(x0_hat, x0).sum().item()
                    for k, v in art_measurements(x0_hat, x0).items():
                        sums[k] = sums.get(k, 0.0) + v * b
            wins += int(((err_true < err_wrong) & has_wrong).sum())
            counted += int(has_wrong.sum())
            n_img += b
        out: dict[str, float | None] = {"loss": sums["loss"] / (n_img * len(TIMESTEPS))}
        out["loss_vs_zero"] = sums["loss"] / max(sums["zero"], 1e-12)
        for k, v in sums.items():
            if k not in ("loss", "zero"):
                out[k] = v / (n_img * len(PSNR_TIMESTEPS))
        out["prompt_adherence"] = wins / counted if counted else None
        return out

    def _pipeline(self, model: torch.nn.Module, encoder):
        from moas.inference.pipeline import Pipeline

        return Pipeline(model, encoder, self.diffusion, self.device)

    def demo_accuracy(self, model: torch.nn.Module, encoder) -> float | None:
        """Held-out accuracy of ``moas eval`` (n = ``eval_n`` per split) on the demo data.

        The attribute mean on the single-character set, the binding mean on a two-character one (module
        docstring); None without demo data or when its manifest cannot be evaluated."""
        if self.demo_dir is None:
            return None
        from moas.eval.evaluate import run_eval

        try:
            result = run_eval(
                self._pipeline(model, encoder),
                self.demo_dir,
                n_per_split=self.eval_n,
                steps=self.sample.steps,
                guidance_scale=self.sample.guidance_scale,
                sampler=self.sample.sampler,
                progress=False,
            )
        except DataError as e:
            log.warning("Demo evaluation skipped: %s", e)
            return None
        return float(result["held_out"]["mean"])

    def folder_metrics(self, model: torch.nn.Module, encoder) -> dict[str, float | None]:
        """Tag adherence, KID, memorisation and their score on the folder (empty without a scorer)."""
        if self.folder is None:
            return {}
        try:
            s = self.sample
            return self.folder(self._pipeline(model, encoder), s.steps, s.guidance_scale, s.sampler)
        except DataError as e:
            log.warning("Folder evaluation skipped: %s", e)
            return {}

    def run(self, model: torch.nn.Module, encoder) -> dict[str, float | None]:
        """All validation numbers for ``model`` (put in eval mode; the caller restores train mode)."""
        model.eval()
        out: dict[str, float | None] = {}
        if self.dataset is not None and len(self.dataset):
            out.update(self._denoise_metrics(model))
        demo = self.demo_accuracy(model, encoder)
        out.update(self.folder_metrics(model, encoder))
        out["demo_accuracy"] = demo
        out["accuracy"] = demo if demo is not None else out.get("prompt_adherence")
        return out
