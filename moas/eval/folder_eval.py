"""Evaluation on the user's own folder: prompt adherence, KID and memorisation, measured by its tag model.

``n`` images are generated from the captions of held-out images (cycling over them; image k has seed
seed + k) and measured with the folder's tag model (:mod:`moas.eval.tagger`):

* ``adherence``: micro precision / recall / F1 of the tags the tag model sees in each generated image
  (probability >= 0.5) against the in-vocabulary tags of the caption it was generated from, over the
  informative tags only (those on fewer than 90 % of the captioned images; ``adherence_tags`` counts them);
  ``adherence_real`` is the same on the real held-out images, the ceiling the tag model allows (only
  captions written by people count there: ``moas caption``'s own would score the tagger against itself);
* ``kid``: KID between the generated and the real held-out images in tag-model features (:mod:`moas.eval.kid`);
* ``memorisation``: the nearest / second-nearest distance ratio test against the training images, in
  tag-model features and in 16×16 pixels (:mod:`moas.eval.memorisation`). ``real_heldout`` is the same test
  on the real held-out images, which no model has seen: the rate at which the rule flags new images of this
  folder (a weak feature space or near-duplicate files flag some), and ``excess`` the generated rate above it,
  the share that is copying rather than the rule's own false alarms.

Every image goes through 64 × 64 first, so generated images (the model's base resolution) and real ones
(the dataset's cached resolution) are compared at one size. These numbers compare moas runs on the same
folder and tag model; they are not published FID / KID / CLIP scores.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moas.errors import DataError
from moas.eval.kid import kid
from moas.eval.memorisation import PIXEL_SIZE, THRESHOLD, memorisation_report
from moas.eval.tag_train import reliability
from moas.eval.tagger import (
    INPUT_SIZE,
    TrainedTagger,
    auto_captioned,
    caption_tags,
    dataset_images,
    resize_images,
    tag_metrics,
)

log = logging.getLogger(__name__)

UNIVERSAL_SHARE = 0.9  # tags on this share of the captioned images or more do not count for adherence
NOTE = "comparisons between moas runs on this folder with its tag model, not published metrics"


def _generate(pipe, prompts, seeds, settings, batch_size, progress, image_dir) -> torch.Tensor:
    steps, guidance_scale, sampler = settings
    out = []
    bar = tqdm(total=len(prompts), desc="folder eval", unit="img", disable=not progress)
    for i in range(0, len(prompts), batch_size):
        images = pipe(
            prompts[i : i + batch_size],
            seeds=seeds[i : i + batch_size],
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
        )  # (b, 3, H, W) uint8 at the model's base resolution
        if image_dir is not None:
            from PIL import Image

            Path(image_dir).mkdir(parents=True, exist_ok=True)
            for k, img in enumerate(images):
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(Path(image_dir) / f"{i + k:04d}.png")
        out.append(images)
        bar.update(len(images))
    bar.close()
    return torch.cat(out)


def _measure(tagger: TrainedTagger, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tag probabilities (n, T), features (n, F) and 16 px copies (n, 3, 16, 16) of uint8 64 px images."""
    feats = tagger.features(images)
    with torch.no_grad():
        probs = torch.sigmoid(tagger.model.head(feats))  # the head on the same features: one pass
    return probs, feats, resize_images(images, PIXEL_SIZE)


def _dataset_side(
    dataset, indices: list[int], tagger: TrainedTagger, chunk: int = 256
) -> tuple[torch.Tensor, ...]:
    """:func:`_measure` of dataset images, read in chunks so a large folder never sits in memory at full
    size, and kept on the tagger (keyed by the files) for the next checkpoint's evaluation."""
    key = ("folder_eval", tuple(str(dataset.paths[i]) for i in indices))
    if key not in tagger.memo:
        parts = [
            _measure(tagger, dataset_images(dataset, indices[k : k + chunk]))
            for k in range(0, len(indices), chunk)
        ]
        if not parts:
            parts = [_measure(tagger, torch.zeros(0, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8))]
        tagger.memo[key] = tuple(torch.cat(p) for p in zip(*parts, strict=True))
    return tagger.memo[key]


def _kid_entry(gen_feats: torch.Tensor, real_feats: torch.Tensor) -> dict:
    entry = {"n_generated": len(gen_feats), "n_real": len(real_feats), "space": "tag-model features"}
    if min(len(gen_feats), len(real_feats)) < 3:
        return {**entry, "mean": None, "std": None, "reason": "needs at least 3 images on each side"}
    mean, std = kid(gen_feats, real_feats)
    return {**entry, "mean": mean, "std": std}


def _real_baseline(real, train, memo: dict, key: tuple) -> dict:
    """The memorisation rates of the real held-out images against the training images; they do not change
    between checkpoints, so they are kept in ``memo`` (the tagger's) under ``key``."""
    if key not in memo:
        base = memorisation_report(real[0], train[0], real[1], train[1], THRESHOLD)
        memo[key] = {"n": len(real[1]), **{s: base[s]["rate"] for s in ("features", "pixels", "combined")}}
    return memo[key]


def _memorisation(gen, train, real, train_idx: list[int], memo: dict, key: tuple) -> dict:
    """``gen`` / ``train`` / ``real``: (16 px images, features) of the generated, training and real
    held-out images; ``memo`` / ``key``: where the real images' rates are kept (:func:`_real_baseline`)."""
    if len(train_idx) < 2:
        return {"reason": f"needs at least 2 training images, got {len(train_idx)}"}
    mem = memorisation_report(gen[0], train[0], gen[1], train[1], THRESHOLD)
    mem["nearest_features"] = [train_idx[j] for j in mem["nearest_features"]]  # dataset indices
    mem["nearest_pixels"] = [train_idx[j] for j in mem["nearest_pixels"]]
    if len(real[1]):
        mem["real_heldout"] = dict(_real_baseline(real, train, memo, key))
        mem["excess"] = round(max(0.0, mem["combined"]["rate"] - mem["real_heldout"]["combined"]), 4)
    return mem


def informative_tags(vocab, captions: list[str], max_share: float = UNIVERSAL_SHARE) -> torch.Tensor:
    """(T,) bool: the vocabulary's tags on fewer than ``max_share`` of the captioned images. A tag nearly
    every image has ("1girl", "solo") is right whatever the model draws and would make an untrained model
    look adherent; all tags when every one is that common."""
    captioned = [c for c in captions if caption_tags(c)]
    if not captioned or not len(vocab):
        return torch.ones(len(vocab), dtype=torch.bool)
    share = vocab.encode_many(captioned).mean(dim=0)  # (T,)
    keep = share < max_share
    return keep if keep.any() else torch.ones(len(vocab), dtype=torch.bool)


def run_folder_eval(
    pipe,
    dataset,
    tagger: TrainedTagger,
    heldout_idx: list[int],
    train_idx: list[int],
    n: int = 64,
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    seed: int = 1234,
    batch_size: int = 16,
    progress: bool = True,
    image_dir: str | Path | None = None,
) -> dict:
    """Generate ``n`` images from held-out captions and measure them (see the module docstring).

    ``heldout_idx`` / ``train_idx``: dataset indices of the generator's held-out and training images."""
    if n < 1:
        raise ValueError("n must be at least 1")
    settings = pipe.settings(steps, guidance_scale, sampler)
    captions = dataset.captions()
    prompt_idx = [i for i in heldout_idx if caption_tags(captions[i])]
    if not prompt_idx:
        raise DataError(
            f"None of the {len(heldout_idx)} held-out images has a caption, so there is nothing to prompt with; "
            "caption more images or hold out more of them."
        )
    cases = [prompt_idx[k % len(prompt_idx)] for k in range(n)]
    t0 = time.perf_counter()
    prompts, seeds = [captions[i] for i in cases], [seed + k for k in range(n)]
    gen = _generate(pipe, prompts, seeds, settings, batch_size, progress, image_dir)
    # Every image goes through 64 px first, so generated and real images are compared at one size.
    gen_probs, gen_feats, gen_small = _measure(tagger, resize_images(gen, INPUT_SIZE))
    vocab = tagger.vocab
    real_probs, real_feats, real_small = _dataset_side(dataset, heldout_idx, tagger)
    auto = auto_captioned(dataset)
    ref = [j for j, i in enumerate(heldout_idx) if caption_tags(captions[i]) and i not in auto]
    _, train_feats, train_small = _dataset_side(dataset, train_idx, tagger)
    paths = tuple(str(dataset.paths[i]) for i in heldout_idx), tuple(str(dataset.paths[i]) for i in train_idx)
    mem = _memorisation(
        (gen_small, gen_feats),
        (train_small, train_feats),
        (real_small, real_feats),
        train_idx,
        tagger.memo,
        ("memorisation_baseline", *paths),
    )
    labels = vocab.encode_many([captions[i] for i in cases])  # (n, T)
    keep = informative_tags(vocab, captions)
    real_labels = vocab.encode_many([captions[heldout_idx[j]] for j in ref])
    result = {
        "adherence": tag_metrics(gen_probs[:, keep], labels[:, keep]),
        "adherence_real": tag_metrics(real_probs[ref][:, keep], real_labels[:, keep]) if ref else None,
        "adherence_tags": int(keep.sum()),
        "kid": _kid_entry(gen_feats, real_feats),
        "memorisation": mem,
        "tagger": _tagger_entry(tagger, len(vocab)),
        "settings": {
            "n": n,
            "steps": settings[0],
            "guidance_scale": settings[1],
            "sampler": settings[2],
            "seed": seed,
            "model_hash": pipe.model_hash,
            "n_prompts": len(prompt_idx),
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "note": NOTE,
    }
    seen = [[vocab.tags[t] for t in (p >= 0.5).nonzero().flatten().tolist()] for p in gen_probs]
    result["cases"] = [
        {"file": str(dataset.paths[i]), "prompt": captions[i], "seed": seed + k, "seen": seen[k]}
        for k, i in enumerate(cases)
    ]
    return result


def _prf_row(name: str, m: dict | None) -> str:
    if m is None:
        return f"  {name:<26}{'—':>10}{'—':>10}{'—':>10}   (no human-written captions held out)"
    return (
        f"  {name:<26}{m['precision']:>10.3f}{m['recall']:>10.3f}{m['f1']:>10.3f}   ({m['n_images']} images)"
    )


def _tagger_entry(tagger: TrainedTagger, n_tags: int) -> dict:
    """The tag model's own quality (held-out, and the best constant answer's F1) for the result."""
    m = tagger.metrics
    return {
        "heldout": m.get("heldout"),
        "baseline_f1": m.get("baseline_f1"),
        "n_tags": n_tags,
        "path": str(tagger.path),
    }


def summary_text(result: dict) -> str:
    """A short aligned table of the folder evaluation."""
    s = result["settings"]
    lines = [
        f"folder eval: {s['n']} images from {s['n_prompts']} held-out captions (seed {s['seed']}, {s['steps']} "
        f"steps, guidance {s['guidance_scale']}, {s['sampler']}, model {s['model_hash'] or '?'})",
        f"  {'tag adherence':<26}{'precision':>10}{'recall':>10}{'F1':>10}",
        _prf_row("generated vs its prompt", result["adherence"]),
        _prf_row("real held-out (ceiling)", result["adherence_real"]),
    ]
    k = result["kid"]
    if k["mean"] is None:
        lines.append(f"  {'KID, tag-model features':<26}—   ({k['reason']})")
    else:
        below = "; below 0: no measurable difference" if k["mean"] < 0 else ""  # the estimate is unbiased
        lines.append(
            f"  {'KID, tag-model features':<26}{k['mean']:.4f} ± {k['std']:.4f}   "
            f"({k['n_generated']} generated vs {k['n_real']} real held-out{below})"
        )
    m = result["memorisation"]
    if "reason" in m:
        lines.append(f"  {'memorised':<26}—   ({m['reason']})")
    else:
        label = f"memorised, d1/d2 < {m['threshold']:.2f}"
        lines.append(
            f"  {label:<26}features {m['features']['rate']:.1%}, pixels {m['pixels']['rate']:.1%}, "
            f"either {m['combined']['rate']:.1%}   ({m['n_train']} training images)"
        )
        if "real_heldout" in m:
            r = m["real_heldout"]
            lines.append(
                f"  {'  real held-out images':<26}features {r['features']:.1%}, pixels {r['pixels']:.1%}, "
                f"either {r['combined']:.1%}   (the rule's false alarms; excess {m['excess']:.1%})"
            )
    metrics = result.get("tagger") or {}
    tag = metrics.get("heldout") or {}
    if "f1" in tag:
        lines.append(
            f"  {'tag model, own held-out':<26}F1 {tag['f1']:.3f}   ({tag['n_images']} images it never trained on)"
        )
        ok, why = reliability(metrics)
        verdict = "reliable" if ok else "UNRELIABLE: the numbers above are close to noise on this folder"
        lines.append(f"  {'evaluator':<26}{verdict} ({why})")
    lines.append(f"  {result.get('note', NOTE)}")
    return "\n".join(lines)
