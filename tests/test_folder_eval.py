"""run_folder_eval with stand-in generators: one that draws what the prompt says, one that copies training images."""

from __future__ import annotations

import pytest
import torch

from moas.errors import DataError
from moas.eval.folder_eval import run_folder_eval, summary_text
from moas.eval.tag_model import caption_tags, resize_images
from moas.eval.tagger import load_or_train_tagger

from .test_tagger import BACKGROUNDS, SQUARES, colour_image, validated, write_folder


class DrawingPipe:
    """Draws each prompt's colours (a generator that follows prompts and copies nothing), at 32 px."""

    model_hash = "draw000001"

    def settings(self, steps=None, guidance_scale=None, sampler=None):
        return (steps or 4, 1.0 if guidance_scale is None else guidance_scale, sampler or "ddim")

    def __call__(self, prompts, seeds, steps=None, guidance_scale=None, sampler=None):
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            tags = caption_tags(prompt)
            bg = next(t for t in tags if t in BACKGROUNDS)
            sq = next((t for t in tags if t in SQUARES), None)
            out.append(colour_image(bg, sq, 32, torch.Generator().manual_seed(10_000 + seed)))
        return torch.stack(out)


class CopyingPipe(DrawingPipe):
    """Returns training images (at ``size`` px) whatever the prompt: a fully memorised generator."""

    model_hash = "copy000001"

    def __init__(self, dataset, train_idx, size):
        self.images = resize_images([dataset[i]["pixels"] for i in train_idx], size)

    def __call__(self, prompts, seeds, steps=None, guidance_scale=None, sampler=None):
        return self.images[[s % len(self.images) for s in seeds]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("fe") / "data", 54)
    ds = validated(root)
    tagger = load_or_train_tagger(ds, seed=0, progress=False, epochs=20)
    heldout, train = list(range(0, 54, 6)), [i for i in range(54) if i % 6]
    return ds, tagger, heldout, train


def test_a_prompt_following_generator_scores_high_and_copies_nothing(folder, tmp_path):
    ds, tagger, heldout, train = folder
    r = run_folder_eval(
        DrawingPipe(), ds, tagger, heldout, train, n=12, seed=0, progress=False, image_dir=tmp_path
    )
    assert len(list(tmp_path.glob("*.png"))) == 12
    assert r["adherence"]["f1"] > 0.8 and r["adherence"]["n_images"] == 12
    assert r["adherence_real"]["n_images"] == len(heldout) and r["adherence_real"]["f1"] > 0.8
    assert r["kid"]["n_generated"] == 12 and r["kid"]["n_real"] == len(heldout)
    assert abs(r["kid"]["mean"]) < 3 * r["kid"]["std"] + 0.05  # drawn like the real ones: little distance
    assert r["memorisation"]["n_train"] == len(train) and r["memorisation"]["combined"]["rate"] <= 0.25
    base = r["memorisation"]["real_heldout"]  # new real images of the folder: the rule's false alarms
    assert base["n"] == len(heldout) and base["combined"] <= 0.25
    assert r["memorisation"]["excess"] == max(
        0.0, round(r["memorisation"]["combined"]["rate"] - base["combined"], 4)
    )
    assert r["settings"] == {
        "n": 12,
        "steps": 4,
        "guidance_scale": 1.0,
        "sampler": "ddim",
        "seed": 0,
        "model_hash": "draw000001",
        "n_prompts": len(heldout),
    }
    assert [c["seed"] for c in r["cases"]] == list(range(12))
    assert r["cases"][9]["prompt"] == ds.captions()[heldout[0]]  # prompts cycle over the held-out captions
    text = summary_text(r)
    assert "KID" in text and "not published" in text and "real held-out" in text


def test_a_copying_generator_is_flagged(folder):
    ds, tagger, heldout, train = folder
    copied = [train[(3 + k) % len(train)] for k in range(8)]
    kept = dict(tagger.memo)  # the real images' measurements from the test above
    r = run_folder_eval(CopyingPipe(ds, train, 24), ds, tagger, heldout, train, n=8, seed=3, progress=False)
    mem = r["memorisation"]
    assert mem["features"]["rate"] == 1.0 and mem["pixels"]["rate"] == 1.0 and mem["combined"]["count"] == 8
    assert mem["nearest_pixels"] == copied and mem["nearest_features"] == copied  # dataset indices
    assert mem["excess"] == 1.0 - mem["real_heldout"]["combined"] >= 0.75  # copying, beyond the false alarms
    # real images read and the real held-out baseline measured once, reused
    assert len(kept) == 3 and all(tagger.memo[k] is v for k, v in kept.items())
    # copies generated at another resolution than the data's: the pixel test still catches every one
    r = run_folder_eval(CopyingPipe(ds, train, 32), ds, tagger, heldout, train, n=8, seed=3, progress=False)
    mem = r["memorisation"]
    assert mem["pixels"]["rate"] == 1.0 and mem["combined"]["rate"] == 1.0 and mem["nearest_pixels"] == copied


def test_no_captioned_held_out_image_is_a_clear_error(folder):
    ds, tagger, _, train = folder
    (ds.root / "img000.txt").unlink()
    uncaptioned = validated(ds.root)
    with pytest.raises(DataError, match="held-out images has a caption"):
        run_folder_eval(DrawingPipe(), uncaptioned, tagger, [0], train, n=2, progress=False)
