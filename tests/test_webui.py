"""The web UI's handlers on a tiny trained model, without a browser: PNGs with prompt and seed, fixed seeds,
one-sentence errors, PNG info, the model cache, inpainting, image-to-image, the routing view, the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from moas.cli import main
from moas.errors import CheckpointError, MoasError
from moas.webui import handlers as h
from moas.webui.app import Actions, build_app

pytestmark = pytest.mark.slow

PROMPT = "1girl, red hair, blue eyes, forest"


@pytest.fixture(scope="module")
def models(session_run) -> Path:
    """The session's trained model files (tests/conftest.py); read-only."""
    return session_run / "models"


@pytest.fixture(scope="module")
def cache(models) -> h.ModelCache:
    c = h.ModelCache("cpu")
    c.get(models / "best_model.safetensors")
    return c


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_pngs_with_prompt_and_seed(cache, models, tmp_path):
    best = models / "best_model.safetensors"
    r = h.run_generate(
        cache, best, PROMPT, "glasses", seed=11, batch_count=2, output_dir=tmp_path, progress=False
    )
    assert r.seed == 11 and len(r.images) == 2
    assert all(p.parent == tmp_path and p.suffix == ".png" for p in r.images)
    assert len({p.name for p in r.images}) == 2 and "seed11" in r.images[0].name
    for i, (path, text) in enumerate(zip(r.images, r.parameters, strict=True)):
        chunk = Image.open(path).info["parameters"]
        assert chunk == text  # what the page shows is what the file holds
        assert chunk.startswith(PROMPT + "\nNegative prompt: glasses\n")
        assert f"Seed: {11 + i}," in chunk and "Steps: 3," in chunk  # tiny.toml's sample.steps
        assert "Model: best_model" in chunk and "Size: 16x16" in chunk
    big = h.run_generate(cache, best, PROMPT, seed=11, size="64x64", output_dir=tmp_path, progress=False)
    assert pixels(big.images[0]).shape == (64, 64, 3)  # the ×4 enhancer size


def test_same_seed_gives_the_same_pixels_and_the_random_seed_is_reported(cache, models, tmp_path):
    best = models / "best_model.safetensors"
    a = h.run_generate(cache, best, PROMPT, seed=5, output_dir=tmp_path, progress=False)
    b = h.run_generate(cache, best, PROMPT, seed=5, output_dir=tmp_path, progress=False)
    assert a.images[0] != b.images[0]  # a new file every time
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    c = h.run_generate(cache, best, PROMPT, seed=6, output_dir=tmp_path, progress=False)
    assert not np.array_equal(pixels(a.images[0]), pixels(c.images[0]))
    rnd = h.run_generate(cache, best, PROMPT, seed=-1, output_dir=tmp_path, progress=False)
    assert 0 <= rnd.seed < h.SEED_RANGE and f"Seed: {rnd.seed}," in rnd.parameters[0]
    forced = h.run_generate(cache, best, PROMPT, seed=5, randomize=True, output_dir=tmp_path, progress=False)
    assert f"Seed: {forced.seed}," in forced.parameters[0]
    again = h.run_generate(cache, best, PROMPT, seed=rnd.seed, output_dir=tmp_path, progress=False)
    assert np.array_equal(pixels(rnd.images[0]), pixels(again.images[0]))  # a shown seed reproduces


def test_bad_input_is_one_sentence(cache, models, tmp_path):
    best = models / "best_model.safetensors"
    cases = [
        (dict(model_path=best, prompt="  "), "prompt is empty"),
        (dict(model_path=best, prompt="1girl, nsfw"), r"blacklisted terms \(nsfw\)"),
        (dict(model_path=best, prompt=PROMPT, size="12x"), "WIDTHxHEIGHT"),
        (dict(model_path=best, prompt=PROMPT, size="4x4"), "between 8 and 4096"),
        (dict(model_path=tmp_path / "gone.safetensors", prompt=PROMPT), "No model file at"),
        (dict(model_path=None, prompt=PROMPT), "No model is selected"),
        (dict(model_path=best, prompt=PROMPT, seed=2**64), "seed must be below"),
    ]
    for kwargs, message in cases:
        with pytest.raises(MoasError, match=message) as e:
            h.run_generate(cache, output_dir=tmp_path, progress=False, **kwargs)
        assert "\n" not in str(e.value) and str(e.value).endswith(".")
    assert not list(tmp_path.glob("*.png"))
    # The page gets the same sentence as a Gradio error (a message in the page, not a traceback).
    act = Actions(cache, models, tmp_path)
    with pytest.raises(gr.Error, match=r"blacklisted terms \(nsfw\)"):
        act.txt2img(str(best), "1girl, nsfw", "", 3, 2.0, "ddim", 1, False, "16x16", 1)
    with pytest.raises(gr.Error, match="No model file at"):
        act.load(str(tmp_path / "gone.safetensors"))
    with pytest.raises(CheckpointError):
        h.ModelCache("cpu").get(tmp_path / "gone.safetensors")


def test_png_info_reads_the_parameters_back(cache, models, tmp_path):
    r = h.run_generate(
        cache, models / "best_model.safetensors", PROMPT, seed=3, output_dir=tmp_path, progress=False
    )
    text = h.png_info(r.images[0])
    assert text == r.parameters[0] and text.startswith(PROMPT) and "Seed: 3," in text
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert "no generation parameters" in h.png_info(tmp_path / "plain.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(MoasError, match="not an image"):
        h.png_info(tmp_path / "junk.png")
    assert h.png_info(None) == ""


def test_the_model_stays_loaded_and_another_one_replaces_it(models):
    cache = h.ModelCache("cpu")
    best, last = models / "best_model.safetensors", models / "last_model.safetensors"
    first = cache.get(best)
    assert cache.get(str(best)) is first and cache.loads == 1
    view = h.model_view(cache, best)
    assert cache.loads == 1 and (view.steps, view.guidance_scale) == (3, 2.0)  # tiny.toml's [sample]
    assert [v for _, v in view.sizes] == ["16x16", "32x32", "64x64"]
    other = cache.get(last)
    assert other is not first and cache.loads == 2 and cache.get(last) is other
    assert [p.name for p in h.list_models(models)] == ["best_model.safetensors", "last_model.safetensors"]
    assert h.default_model(models, models / ".." / models.name / best.name) == best
    assert h.default_model(models, best) == best and h.default_model(models) in set(h.list_models(models))
    assert h.default_model(models / "nothing") is None


def test_sizes_follow_the_training_buckets():
    cfg = {
        "data": {"bucketing": True, "bucket_max_aspect": 2.0},
        "model": {"patch_size": 1, "block_channels": [32, 32]},
    }
    sizes = h.size_choices(cfg, 32)
    assert (32, 32) in sizes and (24, 40) in sizes and (40, 24) in sizes
    assert sizes[-2:] == [(64, 64), (128, 128)]
    assert h.size_choices({}, 32) == [(32, 32), (64, 64), (128, 128)]
    assert h.size_choices({}, 32, 4) == [(128, 128), (32, 32), (64, 64)]  # the cascade first
    assert h.size_label((128, 128), 32, 4) == "128x128 (cascade ×4)"
    assert h.parse_size("40x24 (bucket)") == (40, 24) and h.parse_size("") == (None, None)


def test_editor_mask_is_white_where_painted():
    bg = np.full((6, 8, 4), 100, np.uint8)
    layer = np.zeros((6, 8, 4), np.uint8)
    layer[1:3, 2:5] = (255, 255, 255, 255)
    rgb, mask = h.editor_mask({"background": bg, "layers": [layer], "composite": bg})
    assert rgb.shape == (6, 8, 3) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255} and (mask == 255).sum() == 6 and mask[1:3, 2:5].all()
    small = np.zeros((3, 4, 4), np.uint8)
    small[0, 0, 3] = 255  # a layer at half the canvas size still lands on the right pixels
    _, m2 = h.editor_mask({"background": bg, "layers": [small]})
    assert m2[:2, :2].all() and m2.sum() == 4 * 255
    with pytest.raises(MoasError, match="Nothing to regenerate"):
        h.editor_mask({"background": bg, "layers": [np.zeros_like(layer)]})
    with pytest.raises(MoasError, match="Upload the image"):
        h.editor_mask({"background": None, "layers": []})


def test_inpaint_keeps_the_unpainted_pixels(cache, models, tmp_path):
    rng = np.random.default_rng(0)
    bg = np.concatenate(
        [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), np.full((20, 24, 1), 255, np.uint8)], -1
    )
    layer = np.zeros_like(bg)
    layer[4:12, 6:16] = (255, 255, 255, 255)
    value = {"background": bg, "layers": [layer], "composite": bg}
    best = models / "best_model.safetensors"
    r = h.run_inpaint(cache, best, value, "forest", seed=2, output_dir=tmp_path, progress=False)
    out, painted = pixels(r.images[0]), layer[..., 3] > 0
    assert out.shape == (20, 24, 3) and r.seed == 2
    assert np.array_equal(out[~painted], bg[..., :3][~painted])  # bit for bit
    assert not np.array_equal(out[painted], bg[..., :3][painted])
    assert "RePaint" in r.parameters[0] and "Seed: 2," in r.parameters[0]
    with pytest.raises(MoasError, match="blacklisted"):
        h.run_inpaint(cache, best, value, "nsfw", output_dir=tmp_path, progress=False)


def test_image_to_image_strength(cache, models, tmp_path):
    best = models / "best_model.safetensors"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    init = tmp_path / "init.png"
    txt = h.run_generate(cache, best, PROMPT, seed=9, output_dir=tmp_path, progress=False)
    full = h.run_generate(
        cache, best, PROMPT, seed=9, output_dir=tmp_path, init_image=init, strength=1.0, progress=False
    )
    assert np.array_equal(pixels(full.images[0]), pixels(txt.images[0]))  # strength 1 = text-to-image
    # Strength 0 runs no sampler step: the seed no longer matters.
    z1 = h.run_generate(
        cache, best, PROMPT, seed=1, output_dir=tmp_path, init_image=init, strength=0.0, progress=False
    )
    z2 = h.run_generate(
        cache, best, PROMPT, seed=2, output_dir=tmp_path, init_image=init, strength=0.0, progress=False
    )
    assert np.array_equal(pixels(z1.images[0]), pixels(z2.images[0]))
    half = h.run_generate(
        cache, best, PROMPT, seed=9, output_dir=tmp_path, init_image=init, strength=0.5, progress=False
    )
    assert "Denoising strength: 0.5" in half.parameters[0] and "Init image: init.png" in half.parameters[0]
    assert not np.array_equal(pixels(half.images[0]), pixels(txt.images[0]))
    with pytest.raises(MoasError, match="strength"):
        h.run_generate(cache, best, PROMPT, init_image=init, strength=1.5, output_dir=tmp_path)


def test_routing_view(cache, models, reference):
    brain, own = (
        reference["result"].last_model_path,
        h.ModelCache("cpu"),
    )  # the reference run trains the brain
    text = h.explain(own, brain, PROMPT)
    assert "Expert routing weights" in text and "Prompt language: en" in text
    with pytest.raises(MoasError, match="prompt is empty"):
        h.explain(own, brain, "")
    assert "text-only conditioning" in h.explain(cache, models / "best_model.safetensors", PROMPT)


def test_the_page_builds_with_its_controls(cache, models, tmp_path):
    demo = build_app(models, models / "best_model.safetensors", tmp_path, "cpu", cache)
    assert isinstance(demo, gr.Blocks) and cache.loads == 1  # the cached model was reused
    ids = {c.get("props", {}).get("elem_id") for c in demo.config["components"]}
    assert {"prompt", "generate", "gallery", "seed_used", "editor", "png_file", "routing", "sampler"} <= ids
    # Everything that runs the model shares one queue slot: one request at a time.
    groups = {f.name: (f.concurrency_id, f.concurrency_limit) for f in demo.fns.values()}
    for name in ("txt2img", "img2img", "inpaint", "load", "explain"):
        assert groups[name] == ("model", 1), (name, groups[name])
    empty = build_app(tmp_path / "no_models", None, tmp_path, "cpu", h.ModelCache("cpu"))
    assert isinstance(empty, gr.Blocks)  # opens, and says there is no model
    # Refresh the list: a file that appeared since is offered and picked.
    folder = tmp_path / "later"
    folder.mkdir()
    assert Actions(cache, folder, tmp_path).refresh(None).value is None
    shutil.copy(models / "best_model.safetensors", folder / "new.safetensors")
    assert Actions(cache, folder, tmp_path).refresh(None).value == str(folder / "new.safetensors")


def test_cli_binds_to_localhost_unless_listen(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("moas.webui.app.serve", lambda **kw: seen.append(kw))
    assert main(["webui", "--models_dir", str(tmp_path), "--port", "7999"]) == 0
    assert main(["webui", "--listen"]) == 0
    assert (
        seen[0]["host"] == "127.0.0.1" and seen[0]["port"] == 7999 and seen[0]["models_dir"] == str(tmp_path)
    )
    assert seen[1]["host"] == "0.0.0.0"
    assert main(["webui", "--port", "0"]) != 0
