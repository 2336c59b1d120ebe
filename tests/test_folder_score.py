"""The checkpoint score on a folder and the memorisation veto of best-step selection; the split views the
scorer reads; the caption-coverage warning; ``moas eval`` on a folder that is not the demo."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from moas.eval.best import BestModelKeeper
from moas.eval.folder_eval import summary_text
from moas.eval.folder_score import FolderScorer, folder_score, unreliable
from moas.eval.tag_train import constant_baseline_f1, reliability
from moas.eval.tagger import load_or_train_tagger
from moas.inference.model_card import _evaluator
from moas.inference.model_file import ModelFile

from .test_folder_eval import CopyingPipe, DrawingPipe
from .test_tagger import validated, write_folder


def test_score_is_adherence_less_a_bounded_kid_term():
    assert folder_score(0.8, None, 2.0) == 0.8  # no usable KID: adherence alone
    assert folder_score(0.8, 0.0, 2.0) == 0.8
    assert folder_score(0.8, 1.0, 2.0) == pytest.approx(0.55)
    assert folder_score(0.8, 9.0, 2.0) == pytest.approx(0.3)  # as far as noise or farther: half a point
    assert folder_score(0.8, -0.1, 2.0) == 0.8  # KID below 0 is no measurable difference
    assert folder_score(None, 0.1, 2.0) is None


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("fs") / "data", 54)
    ds = validated(root)
    tagger = load_or_train_tagger(ds, seed=0, progress=False, epochs=20)
    heldout, train = list(range(0, 54, 6)), [i for i in range(54) if i % 6]
    return ds, FolderScorer(ds, tagger, heldout, train, n=12, seed=0)


def test_scorer_ranks_a_drawing_model_above_a_copying_one_and_flags_the_copies(scored):
    ds, scorer = scored
    assert scorer.kid_noise is not None and scorer.kid_noise > 0
    drawing = scorer(DrawingPipe(), 4, 1.0, "ddim")
    copying = scorer(CopyingPipe(ds, scorer.train_idx, 32), 4, 1.0, "ddim")
    assert set(drawing) >= {"folder_adherence", "folder_kid", "memorised", "folder_score"}
    assert drawing["memorised"] == 0.0 and copying["memorised"] > 0.9
    assert copying["memorised_excess"] == copying["memorised"] - copying["memorised_real"] > 0.75
    assert drawing["memorised_excess"] == 0.0
    assert drawing["folder_adherence"] > copying["folder_adherence"]


def _model_file() -> ModelFile:
    return ModelFile(model_args={}, weights={"w": torch.zeros(1)}, config={}, text_encoder="hash")


def test_a_memorising_checkpoint_is_never_chosen(tmp_path, monkeypatch, caplog):
    saved: list[float] = []
    monkeypatch.setattr(
        "moas.eval.best.save_model", lambda path, contents: saved.append(contents.provenance["score"])
    )
    keeper = BestModelKeeper(tmp_path, tmp_path / "best.safetensors", memorisation_limit=0.1)
    assert keeper.update(1, 10, {"folder_score": 0.4, "memorised": 0.0}, _model_file)
    with caplog.at_level(logging.WARNING):
        assert not keeper.update(2, 20, {"folder_score": 0.9, "memorised": 0.5}, _model_file)  # vetoed
    assert "copy a training image" in caplog.text
    assert not keeper.update(3, 30, {"folder_score": 0.3, "memorised": 0.05}, _model_file)  # worse
    assert keeper.update(4, 40, {"folder_score": 0.5, "memorised": 0.1}, _model_file)  # at the limit: allowed
    assert saved == [0.4, 0.5] and keeper.best["epoch"] == 4
    assert [h["vetoed"] for h in keeper.history] == [False, True, False, False]
    # a resumed run keeps the veto in its history
    again = BestModelKeeper(tmp_path, tmp_path / "best.safetensors", memorisation_limit=0.1)
    assert again.best["epoch"] == 4 and again.history[1]["vetoed"]


def test_the_veto_counts_copies_above_the_rate_real_held_out_images_are_flagged(tmp_path, monkeypatch):
    monkeypatch.setattr("moas.eval.best.save_model", lambda path, contents: None)
    keeper = BestModelKeeper(tmp_path, tmp_path / "best.safetensors", memorisation_limit=0.1)
    # a feature space that flags 30 % of new real images: 35 % flagged generated images are 5 % copies
    assert keeper.update(
        1, 10, {"folder_score": 0.4, "memorised": 0.35, "memorised_excess": 0.05}, _model_file
    )
    assert not keeper.update(
        2, 20, {"folder_score": 0.9, "memorised": 0.5, "memorised_excess": 0.2}, _model_file
    )
    assert [h["vetoed"] for h in keeper.history] == [False, True]


def test_split_views_keep_their_own_ram_cache(tmp_path):
    from moas.data.dataset import ArtDataset
    from moas.eval.validate import join_subsets, split_holdout

    root = write_folder(tmp_path / "data", 24)
    ds = ArtDataset(root, 32, tmp_path / "cache", ram_cache_bytes=10**8)
    ds.validate(progress=False)
    train, val = split_holdout(ds, 0.25, 0, 10)
    assert torch.equal(train[0]["pixels"], ds[ds.paths.index(train.paths[0])]["pixels"])
    # the held-out view's first image is its own, not the training view's cached first image
    assert torch.equal(val[0]["pixels"], ds[ds.paths.index(val.paths[0])]["pixels"])
    joined, t_idx, h_idx = join_subsets(train, val)
    assert len(joined) == len(ds) and joined.paths[h_idx[0]] == val.paths[0]
    assert torch.equal(joined[h_idx[0]]["pixels"], val[0]["pixels"])
    assert joined.captions()[t_idx[-1]] == train.captions()[-1]


def test_a_mostly_uncaptioned_folder_is_named_in_a_warning(tmp_path, caplog):
    root = write_folder(tmp_path / "data", 12)
    for txt in sorted(root.rglob("*.txt"))[:8]:
        txt.unlink()
    with caplog.at_level(logging.WARNING):
        report = validated(root).report()
    assert report["captioned"] == 4
    assert "Only 4 of 12 images" in caplog.text and "moas caption" in caplog.text


@pytest.mark.slow
def test_eval_on_a_folder_that_is_not_the_demo_prints_the_three_numbers(
    session_run, tmp_path, monkeypatch, capsys
):
    from moas.cli import main

    folder = tmp_path / "mine"
    shutil.copytree(session_run / "data" / "demo" / "train", folder)
    monkeypatch.chdir(tmp_path)
    model = session_run / "models" / "best_model.safetensors"
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(model),
                "--data_dir",
                str(folder),
                "--n_folder",
                "6",
                "--quiet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "tag adherence" in text and "KID" in text and "memorised" in text
    assert "attribute" not in text.lower()  # the demo's table only on the demo
    import json

    r = json.loads(out.read_text())["folder"]
    assert r["settings"]["n"] == 6 and 0.0 <= r["memorisation"]["combined"]["rate"] <= 1.0
    assert r["split"].startswith("a folder the model was not trained on")


@pytest.mark.slow
def test_eval_on_the_training_folder_reuses_the_runs_tag_model(session_run, tmp_path, monkeypatch, caplog):
    from moas.cli import main

    monkeypatch.chdir(session_run)  # the model file records its folder relative to here
    args = ["eval", "--model", "models/best_model.safetensors", "--data_dir", "data/demo/train"]
    with caplog.at_level(logging.INFO):
        assert main([*args, "--n_folder", "4", "--quiet", "--json", str(tmp_path / "e.json")]) == 0
    assert "Tag model loaded" in caplog.text and "Tag model trained" not in caplog.text


# --- an evaluator that cannot see the pictures --------------------------------------------------------
def test_a_tag_model_must_beat_the_commonest_tags_to_be_trusted():
    train = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 1], [1, 1, 0]])
    heldout = torch.tensor([[1, 0, 0], [1, 1, 0]])
    # the best constant answer is tags 0 and 1 for every image: P 3/4, R 1 (tag 0 alone: P 1, R 2/3)
    assert constant_baseline_f1(train, heldout) == pytest.approx(6 / 7, abs=1e-4)
    good = {"heldout": {"f1": 0.72}, "baseline_f1": 0.2}
    assert reliability(good)[0] and "0.720" in reliability(good)[1]
    noise = {"heldout": {"f1": 0.069}, "baseline_f1": 0.05}
    ok, why = reliability(noise)
    assert not ok and "0.069" in why and "under 0.3" in why
    assert not reliability({"heldout": {"f1": 0.55}, "baseline_f1": 0.5})[0]  # no better than a constant
    assert reliability({"heldout": {"f1": 0.55}})[0]  # an older cached model: the F1 bar alone


class Noise:
    """A tag model as a run gets it: only its metrics matter here."""

    metrics = {"heldout": {"f1": 0.069, "n_images": 20}, "baseline_f1": 0.05}


def test_an_unreliable_evaluator_says_so_and_leaves_best_step_selection(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        scorer = FolderScorer(None, Noise(), [], [], n=4, seed=0)
    assert not scorer.reliable and "The folder evaluator is unreliable" in caplog.text
    mem = {
        "combined": {"rate": 0.5},
        "features": {"rate": 0.5},
        "pixels": {"rate": 0.125},
        "real_heldout": {"combined": 0.3, "pixels": 0.1},
        "excess": 0.2,
    }
    out = unreliable({"folder_score": 0.8, "memorised": 0.5, "memorised_excess": 0.2}, mem)
    assert out["folder_score"] is None and out["folder_score_unreliable"] == 0.8
    assert out["memorised"] == 0.125 and out["memorised_excess"] == 0.025  # pixels alone
    saved: list = []
    monkeypatch.setattr("moas.eval.best.save_model", lambda path, contents: saved.append(contents.provenance))
    keeper = BestModelKeeper(tmp_path, tmp_path / "best.safetensors", memorisation_limit=0.1)
    metrics = {**out, "prompt_adherence": 0.4, "tagger_f1": 0.069, "folder_reliable": 0.0}
    assert keeper.update(1, 10, metrics, _model_file)
    assert keeper.metric == "prompt_adherence" and not keeper.history[0]["vetoed"]
    assert saved[0]["evaluator_reliable"] is False and saved[0]["evaluator_f1"] == 0.069
    card = "\n".join(_evaluator(saved[0]))
    assert "**unreliable**" in card and "0.069" in card and "folder score was not used" in card


def test_moas_eval_prints_the_evaluators_verdict_next_to_its_numbers():
    result = {
        "settings": {
            "n": 4,
            "n_prompts": 4,
            "seed": 0,
            "steps": 2,
            "guidance_scale": 1.0,
            "sampler": "ddim",
            "model_hash": "x",
        },
        "adherence": {"precision": 0.1, "recall": 0.1, "f1": 0.1, "n_images": 4},
        "adherence_real": {"precision": 0.1, "recall": 0.1, "f1": 0.1, "n_images": 4},
        "kid": {"mean": None, "reason": "too few"},
        "memorisation": {"reason": "too few"},
        "tagger": Noise.metrics,
    }
    text = summary_text(result)
    assert "F1 0.069" in text and "UNRELIABLE" in text and "commonest tags: 0.050" in text
