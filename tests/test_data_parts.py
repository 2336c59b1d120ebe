"""Unit tests of the data pipeline's parts: embeddings, captions, collate, buckets, sampler, style."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from moas.data.artist_style import STYLE_DIM, ArtistStyleDatabase, StyleAnalyzer, style_key
from moas.data.buckets import bucket_step, make_buckets, nearest_bucket
from moas.data.captions import CaptionAugment, read_caption
from moas.data.dataset import ArtDataset, center_crop_resize, smart_collate_fn
from moas.data.embeddings import STAT_FEATURES, _create_hash_embedding, _create_image_stat_embedding
from moas.data.sampler import BucketBatchSampler, repeat_count, sample_weights
from moas.errors import MoasError
from moas.models.style_token import DesignStyleSupportSystem

EMBED_SCRIPT = """
import sys, torch
from moas.data.embeddings import _create_image_stat_embedding, _create_hash_embedding
g = torch.Generator().manual_seed(5)
px = torch.randint(0, 256, (3, 20, 28), generator=g, dtype=torch.uint8)
sys.stdout.write(_create_image_stat_embedding(px).numpy().tobytes().hex() + " ")
sys.stdout.write(_create_hash_embedding("1girl, red hair", 768).numpy().tobytes().hex())
"""


def test_embeddings_are_768d_and_bit_identical_across_processes():
    g = torch.Generator().manual_seed(5)
    px = torch.randint(0, 256, (3, 20, 28), generator=g, dtype=torch.uint8)
    stat = _create_image_stat_embedding(px)
    hashed = _create_hash_embedding("1girl, red hair", 768)
    assert stat.shape == (768,) and stat.dtype == torch.float32 and hashed.shape == (768,)
    out = subprocess.run(
        [sys.executable, "-c", EMBED_SCRIPT], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out == [stat.numpy().tobytes().hex(), hashed.numpy().tobytes().hex()]


def test_image_stat_embedding_values():
    px = torch.zeros(3, 4, 4, dtype=torch.uint8)
    px[0] = 255  # pure red
    e = _create_image_stat_embedding(px)
    assert e[:4].tolist() == [1.0, 0.0, 1.0, 1.0] and e[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert e[12 + 49] == 1.0 and e[12 + 50] == 1.0  # R in the top bin, G in the bottom bin
    assert e[12:162].sum() == pytest.approx(3.0)  # each histogram sums to 1
    assert e[162:165].tolist() == [0.0, 0.0, 0.0]  # constant channels: correlation 0
    assert torch.equal(e[STAT_FEATURES : 2 * STAT_FEATURES], e[:STAT_FEATURES])  # cyclic fill rule
    noisy = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    corr = _create_image_stat_embedding(torch.stack([noisy[0]] * 3))[162:165]
    assert torch.allclose(corr, torch.ones(3))
    hb = _create_hash_embedding("x", 768)
    assert torch.equal(hb, _create_hash_embedding("x", 768)) and not torch.equal(
        hb, _create_hash_embedding("y", 768)
    )


def test_captions_augment_keep_shuffle_dropout(tmp_path, caplog):
    aug = CaptionAugment(keep_tokens=1, shuffle_tags=True)
    cap = "alice, red hair, smile, forest, night"
    outs = {aug(cap, 0, e, 3) for e in range(20)}
    assert len(outs) > 3 and all(o.startswith("alice, ") for o in outs)
    assert all(sorted(o.split(", ")) == sorted(cap.split(", ")) for o in outs)
    assert aug(cap, 0, 4, 3) == aug(cap, 0, 4, 3)  # pure function of (seed, epoch, index)
    for rate in (0.5, 0.2):  # each of the 4 droppable tags goes with probability `rate`; "alice" stays
        drop = CaptionAugment(keep_tokens=1, tag_dropout=rate)
        outs = [drop(cap, 0, e, 0).split(", ") for e in range(200)]
        assert all(o[0] == "alice" for o in outs)
        dropped = 1 - np.mean([len(o) - 1 for o in outs]) / 4  # 800 draws: ±0.018 (1 s.d.) at 0.5
        assert abs(dropped - rate) < 0.06, (rate, dropped)
    cd = CaptionAugment(caption_dropout=0.3)
    empties = sum(cd(cap, 1, e, 0) == "" for e in range(400))
    assert 80 < empties < 160
    assert CaptionAugment()(cap, 0, 0, 0) == cap
    img = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(img)
    (tmp_path / "a.txt").write_text("   \n")
    with caplog.at_level(logging.WARNING):
        assert read_caption(img) == "" and read_caption(img) == ""
    assert caplog.text.count("is empty") == 1  # warned once


def test_smart_collate_pads_tokens_and_stacks_styles():
    items = [
        {
            "pixels": torch.zeros(3, 4, 6, dtype=torch.uint8),
            "caption": "a" * i,
            "index": i,
            "image_embed": torch.full((768,), float(i)),
            "style": torch.full((STYLE_DIM,), float(i)),
            "has_style": i == 1,
            "text_embed": torch.ones(i + 1, 768),
        }
        for i in range(3)
    ]
    b = smart_collate_fn(items)
    assert b["pixels"].shape == (3, 3, 4, 6) and b["style"].shape == (3, STYLE_DIM)
    assert b["has_style"].tolist() == [False, True, False]
    assert b["text_embed"].shape == (3, 3, 768)
    assert b["text_embed_mask"].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert b["text_embed"][0, 1:].abs().sum() == 0  # zero padding
    items[1]["pixels"] = torch.zeros(3, 6, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="mixes image sizes"):
        smart_collate_fn(items)


def test_buckets_are_area_preserving_and_divisible():
    for res, div in ((512, 8), (256, 4), (32, 2), (16, 2), (1024, 16)):
        buckets = make_buckets(res, div)
        assert (res, res) in buckets
        step = bucket_step(res, div)
        assert step % div == 0 and (res < 256 or step % 64 == 0)
        for w, h in buckets:
            assert w % step == 0 and h % step == 0 and w * h <= res * res
            assert w * h >= res * res * 0.75  # close to the target area
    buckets = make_buckets(512, 8)
    assert buckets[nearest_bucket(1000, 600, buckets)] == (640, 384)
    assert buckets[nearest_bucket(600, 1000, buckets)] == (384, 640)
    assert buckets[nearest_bucket(100, 100, buckets)] == (512, 512)
    assert buckets[nearest_bucket(5000, 100, buckets)] == (640, 384)  # extreme: nearest, never dropped


def test_center_crop_resize_keeps_the_centre():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 30, 20))  # white centre square
    out = np.asarray(center_crop_resize(img, 8))
    assert out.shape == (8, 8, 3) and out.min() > 200
    assert center_crop_resize(img, (16, 8)).size == (16, 8)


def test_sample_weights_repeat_folders_and_multiply(tmp_path):
    root = tmp_path
    paths = [
        root / "3_alice" / "a.png",
        root / "bob" / "b.png",
        root / "bob" / "deep" / "c.png",
        root / "d.png",
    ]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    (root / "bob" / "multiply.txt").write_text("0.5")
    (root / "bob" / "deep" / "multiply.txt").write_text("3")
    assert repeat_count(paths[0], root) == 3
    assert sample_weights(paths, root) == [3.0, 0.5, 1.5, 1.0]


def test_sampler_weights_buckets_fill_and_determinism():
    buckets = [0] * 5 + [1] * 3
    weights = [2.0, 1.0, 1.0, 1.0, 0.5, 1.5, 1.0, 0.0]
    s = BucketBatchSampler(buckets, weights, batch_size=4, seed=7)
    e0 = s.epoch_batches(0)
    assert e0 == BucketBatchSampler(buckets, weights, 4, seed=7).epoch_batches(0)  # pure
    assert e0 != s.epoch_batches(1)
    for e in range(20):
        batches = s.epoch_batches(e)
        flat = [i for b in batches for i in b]
        assert all(len(b) == 4 for b in batches)
        assert all(len({buckets[i] for i in b}) == 1 for b in batches)  # one bucket per batch
        assert {0, 1, 2, 3, 5, 6} <= set(flat) and 7 not in flat  # nothing dropped, weight 0 excluded
        assert flat.count(0) >= 2
    # Expected counts equal the weights (batch 1: no filling), fractional parts resampled per epoch.
    one = BucketBatchSampler(buckets, weights, batch_size=1, seed=7)
    counts = np.array(
        [[sum(i == k for b in one.epoch_batches(e) for i in b) for k in range(8)] for e in range(300)]
    )
    assert np.allclose(counts.mean(0), weights, atol=0.12)
    assert set(counts[:, 4].tolist()) == {0, 1} and set(counts[:, 5].tolist()) == {1, 2}
    s.set_epoch(3)
    assert list(iter(s)) == s.epoch_batches(3) and len(s) == len(s.epoch_batches(3))
    # Single small bucket, batch larger than the data: filled by re-drawing.
    assert BucketBatchSampler([0, 0], [1, 1], 5).epoch_batches(0)[0].count(0) >= 1


def test_style_analyzer_and_database(tmp_path):
    an = StyleAnalyzer()
    rng = np.random.default_rng(0)
    noisy = torch.from_numpy(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8))
    flat = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    fn, ff = an(noisy), an(flat)
    assert fn.shape == (STYLE_DIM,) and torch.isfinite(fn).all() and torch.isfinite(ff).all()
    assert torch.equal(fn, an(noisy)) and not torch.allclose(fn, ff)
    assert fn[24] > ff[24]  # more edge energy in noise than in a flat fill
    assert style_key(tmp_path / "10_alice" / "x" / "a.png", tmp_path) == "alice"
    assert style_key(tmp_path / "bob_001.png", tmp_path) == "bob"
    assert style_key(tmp_path / "single.png", tmp_path) is None
    db = ArtistStyleDatabase()
    db.add("alice", fn)
    db.add("alice", ff)
    db.add("bob", ff)
    assert torch.allclose(db.get("alice"), (fn + ff) / 2)
    path = db.save(tmp_path / "db.json")
    again = ArtistStyleDatabase.load(path)
    assert again.names() == ["alice", "bob"] and torch.allclose(again.get("bob"), ff)
    assert json.loads(path.read_text())["styles"]["alice"]["count"] == 2
    with pytest.raises(MoasError, match="known styles: alice, bob"):
        again.get("carol")
    path.write_text("{not json")
    with pytest.raises(MoasError, match="not valid JSON"):
        ArtistStyleDatabase.load(path)


def test_style_stage_is_zero_at_init_and_masked():
    m = DesignStyleSupportSystem(STYLE_DIM)
    out = m(torch.randn(2, STYLE_DIM), torch.tensor([True, False]))
    assert out["extra_context"].shape == (2, 1, 768) and out["extra_context"].abs().sum() == 0
    assert out["extra_context_mask"].tolist() == [[True], [False]]


def test_dataset_style_keys_buckets_and_dummy_samples(tmp_path):
    for name, size in (("alice/a.png", (40, 20)), ("alice/b.png", (20, 40)), ("bob/c.png", (24, 24))):
        p = tmp_path / "data" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(
            np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        ).save(p)
    d = ArtDataset(tmp_path / "data", 32, tmp_path / "cache", bucketing=True, divisor=2, extract_style=True)
    d.validate(progress=False)
    shapes = [tuple(d[i]["pixels"].shape) for i in range(3)]
    assert shapes == [(3, 24, 40), (3, 40, 24), (3, 32, 32)]
    assert d.style_db.names() == ["alice", "bob"] and all(d[i]["has_style"] for i in range(3))
    assert torch.equal(d[0]["style"], d[1]["style"]) and not torch.equal(d[0]["style"], d[2]["style"])
    with pytest.raises(ValueError, match="real images"):
        d._create_dummy_samples()


def test_pipeline_style_selection_errors():
    from dataclasses import asdict

    from moas.config import DiffusionConfig, TextConfig
    from moas.inference.pipeline import Pipeline
    from moas.models.generator import MoasGenerator
    from moas.text.encoder import TextEncoder

    model_args = dict(block_channels=[32, 32], cross_attention=[False, True], attention_head_dim=16)
    enc = TextEncoder(None, allow_bundled=False)
    plain = Pipeline(
        MoasGenerator(16, model_args, asdict(TextConfig())), enc, DiffusionConfig(), torch.device("cpu")
    )
    with pytest.raises(MoasError, match="trained without styles"):
        plain.set_style("alice")
    styled = Pipeline(
        MoasGenerator(16, model_args, asdict(TextConfig()), STYLE_DIM),
        enc,
        DiffusionConfig(),
        torch.device("cpu"),
    )
    db = ArtistStyleDatabase()
    db.add("alice", torch.ones(STYLE_DIM))
    styled.style_db = db.to_dict()
    styled.set_style("alice")
    assert torch.equal(styled.style, torch.ones(STYLE_DIM))
    imgs = styled(["1girl"], [0], steps=2)
    assert imgs.shape == (1, 3, 16, 16)
    styled.set_style(None)
    assert styled.style is None
