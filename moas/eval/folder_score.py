"""The checkpoint score on any captioned folder: tag adherence and KID from the folder's own tag model, and
the memorisation rate that vetoes a checkpoint (moas.eval.best).

At each checkpoint the model draws ``n`` images from the captions of the held-out images
(:func:`moas.eval.folder_eval.run_folder_eval`). The score is

    folder_score = adherence F1 − 0.5 × min(1, KID / KID_noise)

where KID_noise is the KID of uniform pixel noise against the held-out images: a model whose images are
distributed like the real ones loses nothing, one as far from them as noise loses half a point of F1.
Dividing by that reference makes the KID term comparable between folders, whose tag models have feature
spaces of different scales. (Flat colour fields were tried as the reference and rejected: on colour-driven
tags their features sit closer to the real images than other real images do.)

An evaluator is only as good as its tag model: below ``moas.eval.tag_train.MIN_RELIABLE_F1`` held-out F1
(or not clearly above always answering the folder's commonest tags) the scorer says so at the start, logs
``folder_reliable`` 0 and its numbers as ``*_unreliable``, and leaves the folder score out of best-step
selection, with the memorisation veto in pixel space.
"""

from __future__ import annotations

import logging

import torch

from moas.eval.folder_eval import run_folder_eval
from moas.eval.kid import kid
from moas.eval.tag_train import reliability
from moas.eval.tagger import TrainedTagger, dataset_images

log = logging.getLogger(__name__)

KID_WEIGHT = 0.5


def noise_reference_kid(
    dataset, tagger: TrainedTagger, heldout_idx: list[int], seed: int = 0
) -> float | None:
    """KID of uniform noise images against the held-out images (the score's KID scale); None if too few."""
    if len(heldout_idx) < 3:
        return None
    real = dataset_images(dataset, heldout_idx)  # (h, 3, 64, 64) uint8
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, tuple(real.shape), generator=gen, dtype=torch.uint8)
    value, _ = kid(tagger.features(noise), tagger.features(real))
    return value if value > 0 else None


def folder_score(f1: float | None, kid_mean: float | None, kid_noise: float | None) -> float | None:
    """The formula of the module docstring; the F1 alone when there is no usable KID."""
    if f1 is None:
        return None
    if kid_mean is None or kid_noise is None:
        return f1
    return f1 - KID_WEIGHT * min(1.0, max(0.0, kid_mean) / kid_noise)


class FolderScorer:
    """Scores one model on a folder: the numbers best-step selection and TensorBoard read."""

    def __init__(
        self,
        dataset,
        tagger: TrainedTagger,
        heldout_idx: list[int],
        train_idx: list[int],
        n: int,
        seed: int,
    ) -> None:
        self.dataset, self.tagger, self.n, self.seed = dataset, tagger, n, seed
        self.heldout_idx, self.train_idx = heldout_idx, train_idx
        self.kid_noise = noise_reference_kid(dataset, tagger, heldout_idx, seed)
        self.reliable, self.why = reliability(tagger.metrics)
        if not self.reliable:
            log.warning(
                "The folder evaluator is unreliable on %s: %s. Its tag adherence, KID and feature-space "
                "memorisation are close to noise here, so the best step is chosen without the folder score "
                "(by the next measure: prompt adherence on the validation images, else their SSIM) and the "
                "memorisation veto uses pixels only. The numbers are still logged, marked unreliable.",
                getattr(dataset, "root", "this folder"),
                self.why,
            )

    def __call__(self, pipe, steps: int, guidance_scale: float, sampler: str) -> dict[str, float | None]:
        r = run_folder_eval(
            pipe,
            self.dataset,
            self.tagger,
            self.heldout_idx,
            self.train_idx,
            n=self.n,
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            seed=self.seed,
            progress=False,
        )
        f1 = r["adherence"]["f1"]
        kid_mean = r["kid"]["mean"]
        mem = r["memorisation"]
        out = {
            "folder_adherence": f1,
            "folder_kid": kid_mean,
            "memorised": mem["combined"]["rate"] if "combined" in mem else None,
            "memorised_features": mem["features"]["rate"] if "features" in mem else None,
            "memorised_pixels": mem["pixels"]["rate"] if "pixels" in mem else None,
            "memorised_real": mem["real_heldout"]["combined"] if "real_heldout" in mem else None,
            "memorised_excess": mem.get("excess"),
            "folder_score": folder_score(f1, kid_mean, self.kid_noise),
            "tagger_f1": float(self.tagger.metrics["heldout"]["f1"]),  # the evaluator's own quality
            "folder_reliable": 1.0 if self.reliable else 0.0,
        }
        return out if self.reliable else unreliable(out, mem)


def unreliable(out: dict[str, float | None], mem: dict) -> dict[str, float | None]:
    """The numbers of an unreliable evaluator, kept for the record (``*_unreliable``) but out of best-step
    selection: no folder score (the next measure decides) and the memorisation veto in pixels alone."""
    out["folder_score_unreliable"], out["folder_score"] = out["folder_score"], None
    if "pixels" in mem:
        out["memorised"] = mem["pixels"]["rate"]
        real = mem.get("real_heldout", {}).get("pixels")
        out["memorised_real"] = real
        out["memorised_excess"] = None if real is None else round(max(0.0, mem["pixels"]["rate"] - real), 4)
    return out
