"""What the web UI's buttons do, as plain functions over one cached pipeline.

Nothing here imports Gradio, so the tests call these directly. User errors are raised as ``MoasError``
(one sentence); ``moas.webui.app`` shows them in the page. Every generation goes through
``moas.inference.generate.generate`` or ``moas.inference.edit.edit``, so the web UI writes the same PNGs,
with the same ``parameters`` chunk, as ``moas generate`` and ``moas edit``.
"""

from __future__ import annotations

import gc
import json
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open

from moas.device import resolve_device
from moas.errors import CheckpointError, MoasError
from moas.inference.aspect import trained_sizes
from moas.inference.edit import EditRequest, edit
from moas.inference.generate import GenerateRequest, generate, validate_request
from moas.inference.model_file import SUFFIX, read_model_file
from moas.inference.pipeline import Pipeline

SEED_RANGE = 2**32  # random seeds stay below this, as A1111's do, so they can be typed back in


def list_models(models_dir: str | Path) -> list[Path]:
    """The ``.safetensors`` model files in ``models_dir``, by name (none when it does not exist)."""
    d = Path(models_dir)
    return sorted(d.glob(f"*{SUFFIX}")) if d.is_dir() else []


def default_model(models_dir: str | Path, model: str | Path | None = None) -> Path | None:
    """``model`` when given (spelled as the picker lists it when it lies in ``models_dir``), else the newest
    model file in ``models_dir``; None when there is none."""
    files = list_models(models_dir)
    if model:
        same = [p for p in files if p.resolve() == Path(model).resolve()]
        return same[0] if same else Path(model)
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None


def model_config(path: str | Path) -> dict:
    """The training config saved in a model file. For ``.safetensors`` only the metadata is read, not the
    weights, which the pipeline has already loaded."""
    p = Path(path)
    if p.suffix != SUFFIX:
        return read_model_file(p).config
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {}).get("config", "{}"))
    except (SafetensorError, OSError, ValueError):
        return {}


class ModelCache:
    """One loaded ``Pipeline``, kept between requests; asking for another model file replaces it.

    ``lock`` serialises the requests that use the pipeline (the Gradio queue already runs them one at a
    time; the lock keeps that true for any other caller)."""

    def __init__(self, device: str = "auto") -> None:
        self.device = device
        self.lock = threading.RLock()
        self.loads = 0  # how many times a model file was read (the tests check the cache holds)
        self.config: dict = {}  # the loaded model's training config
        self._key: tuple | None = None
        self._pipe: Pipeline | None = None

    def get(self, path: str | Path | None) -> Pipeline:
        if not path:
            raise MoasError(
                "No model is selected; put a .safetensors model file in --models_dir or pass --model."
            )
        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"No model file at {p}.")
        key = (p.resolve(), p.stat().st_mtime_ns)  # a file retrained in place is loaded again
        with self.lock:
            if key != self._key:
                # Drop the old model before reading the new one, so two never sit in memory together.
                self._pipe, self._key = None, None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self._pipe = Pipeline.from_file(p, resolve_device(self.device))
                self.config = model_config(p)
                self._key = key
                self.loads += 1
            return self._pipe


def size_choices(config: dict, resolution: int, scale: int = 1) -> list[tuple[int, int]]:
    """(width, height) sizes to offer: the model's training buckets (else its base square) times ``scale``,
    its super-resolution stage's factor (the cascade's outputs, first: the default); then the base, ×2 and
    ×4 squares not among them."""
    cascade = [(w * scale, h * scale) for w, h in trained_sizes(config, resolution)]
    squares = [(resolution * k, resolution * k) for k in (1, 2, 4)]
    return cascade + [s for s in squares if s not in cascade]


def size_label(size: tuple[int, int], resolution: int, scale: int = 1) -> str:
    w, h = size
    if scale > 1 and w == h == resolution * scale:
        return f"{w}x{h} (cascade ×{scale})"
    if w == h and w % resolution == 0 and w > resolution:
        return f"{w}x{h} (×{w // resolution})"
    return f"{w}x{h}" + (" (base)" if w == h == resolution else "")


@dataclass
class ModelView:
    """What the page shows for the loaded model: a status line and the settings it starts from."""

    status: str
    sizes: list[tuple[str, str]]  # (label, "WxH") for the size picker
    steps: int
    guidance_scale: float
    sampler: str


def model_view(cache: ModelCache, path: str | Path | None) -> ModelView:
    """Load ``path`` (or keep it loaded) and describe it, with its own sampler defaults."""
    pipe = cache.get(path)
    steps, scale, sampler = pipe.settings()
    r = pipe.resolution
    k = pipe.sr.scale if pipe.sr is not None else 1
    sizes = [(size_label(s, r, k), f"{s[0]}x{s[1]}") for s in size_choices(cache.config, r, k)]
    if pipe.sr is not None:
        upscaler = f"a super-resolution stage (×{k} diffusion)"
    else:
        upscaler = "a trained enhancer" if pipe.enhancer is not None else "no enhancer (bicubic resizing)"
    status = f"Loaded **{Path(path).name}**: {r} px base resolution, {upscaler}, on {pipe.device}."
    return ModelView(status, sizes, steps, scale, sampler)


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """``"WxH"`` (what the size picker holds) → (W, H); empty → the model's base size."""
    if not text:
        return None, None
    try:
        w, h = (int(v) for v in str(text).split(" ")[0].lower().split("x"))
    except ValueError:
        raise MoasError(f"The size must be WIDTHxHEIGHT in pixels, e.g. 64x64, got {text!r}.") from None
    for name, v in (("width", w), ("height", h)):
        if not 8 <= v <= 4096:
            raise MoasError(f"The {name} must be between 8 and 4096 pixels, got {v}.")
    return w, h


def pick_seed(seed: float | int | None, randomize: bool = False) -> int:
    """The seed to use: a fresh random one for -1 (or ``randomize``), else ``seed``."""
    if randomize or seed is None or int(seed) < 0:
        return random.SystemRandom().randrange(SEED_RANGE)
    if int(seed) >= 2**63:  # torch generators take 64-bit seeds, and a batch adds its index
        raise MoasError("The seed must be below 2^63, or -1 for a random one.")
    return int(seed)


def output_file(output_dir: str | Path, seed: int) -> Path:
    """A new PNG name in ``output_dir``: time stamp (to the millisecond) and seed, never one in use."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = time.time()
    stem = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{int(now * 1000) % 1000:03d}-seed{seed}"
    for n in range(1000):
        name = stem if n == 0 else f"{stem}-{n}"
        if not (out / f"{name}.png").exists() and not (out / f"{name}_000.png").exists():
            return out / f"{name}.png"
    raise MoasError(f"Could not find a free file name in {out}.")


def read_parameters(path: str | Path) -> str:
    """The ``parameters`` text chunk of a PNG (what A1111 and ``moas generate`` write), or ``""``."""
    try:
        with Image.open(path) as img:
            return str(img.info.get("parameters", ""))
    except (OSError, UnidentifiedImageError):
        raise MoasError(f"{Path(path).name} is not an image that can be read.") from None


def png_info(path: str | Path | None) -> str:
    """What the PNG info tab shows for a dropped file."""
    if not path:
        return ""
    text = read_parameters(path)
    return text or "This image has no generation parameters (no PNG 'parameters' chunk)."


@dataclass
class Result:
    images: list[Path]  # the PNGs written, in gallery order
    parameters: list[str]  # each PNG's parameters chunk, read back from the file
    seed: int  # the seed of the first image (image i has seed + i)


def run_generate(
    cache: ModelCache,
    model_path: str | Path | None,
    prompt: str,
    negative_prompt: str = "",
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    seed: int | None = -1,
    randomize: bool = False,
    size: str | None = None,
    batch_count: int = 1,
    output_dir: str | Path = "outputs/webui",
    init_image: str | Path | None = None,
    strength: float = 0.75,
    progress: bool = True,
) -> Result:
    """Text-to-image, or image-to-image when ``init_image`` is given; unset settings are the model's."""
    width, height = parse_size(size)
    req = GenerateRequest(
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        num_images=int(batch_count),
        width=width,
        height=height,
        init_image=str(init_image) if init_image else None,
        strength=float(strength),
    )
    if steps is not None:
        req.steps = int(steps)
    validate_request(req)  # an empty or refused prompt fails before any model is loaded
    with cache.lock:
        pipe = cache.get(model_path)
        req.steps, req.guidance_scale, req.sampler = pipe.settings(
            None if steps is None else int(steps),
            None if guidance_scale is None else float(guidance_scale),
            sampler or None,
        )
        req.seed = pick_seed(seed, randomize)
        paths = generate(pipe, req, output_file(output_dir, req.seed), Path(model_path).stem, progress)
    return Result(paths, [read_parameters(p) for p in paths], req.seed)


def editor_mask(value: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """An ImageEditor value → (the background RGB uint8 (H, W, 3), the mask uint8 (H, W): 255 where
    anything was drawn on a layer, which is regenerated, 0 elsewhere, which is kept)."""
    bg = None if value is None else value.get("background")
    if bg is None:
        raise MoasError("Upload the image to inpaint first, then paint over the part to regenerate.")
    bg = np.asarray(bg, dtype=np.uint8)
    rgb = bg[..., :3] if bg.ndim == 3 else np.repeat(bg[..., None], 3, axis=-1)
    h, w = rgb.shape[:2]
    mask = np.zeros((h, w), dtype=bool)
    for layer in value.get("layers") or []:
        a = np.asarray(layer)
        # RGBA layers (the editor's default): drawn where opaque; any other mode: where not black
        drawn = a[..., 3] > 0 if a.ndim == 3 and a.shape[-1] == 4 else (a > 0 if a.ndim == 2 else a.any(-1))
        if drawn.shape != (h, w):  # a layer the editor kept at another canvas size
            drawn = np.asarray(Image.fromarray(drawn).resize((w, h), Image.NEAREST))
        mask |= drawn
    if not mask.any():
        raise MoasError("Nothing to regenerate: paint over the part of the image to redraw first.")
    return np.ascontiguousarray(rgb), mask.astype(np.uint8) * 255


def run_inpaint(
    cache: ModelCache,
    model_path: str | Path | None,
    editor_value: dict | None,
    prompt: str,
    negative_prompt: str = "",
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = -1,
    randomize: bool = False,
    output_dir: str | Path = "outputs/webui",
    progress: bool = True,
) -> Result:
    """Inpaint the painted region of the editor's image; every unpainted pixel is kept bit for bit."""
    rgb, mask = editor_mask(editor_value)
    # The same prompt checks as text-to-image, the blacklist included.
    check = GenerateRequest(prompt=prompt or "", steps=int(steps) if steps is not None else 1)
    validate_request(check)
    with cache.lock:
        pipe = cache.get(model_path)
        steps_, scale, _ = pipe.settings(
            None if steps is None else int(steps), None if guidance_scale is None else float(guidance_scale)
        )
        used = pick_seed(seed, randomize)
        out = output_file(output_dir, used)
        with tempfile.TemporaryDirectory() as tmp:
            Image.fromarray(rgb).save(Path(tmp) / "image.png")
            Image.fromarray(mask).save(Path(tmp) / "mask.png")
            req = EditRequest(
                image=str(Path(tmp) / "image.png"),
                prompt=prompt,
                mask=str(Path(tmp) / "mask.png"),
                negative_prompt=negative_prompt or "",
                steps=steps_,
                guidance_scale=scale,
                seed=used,
            )
            edit(pipe, req, out, progress=progress)
    return Result([out], [read_parameters(out)], used)


def explain(cache: ModelCache, model_path: str | Path | None, prompt: str) -> str:
    """The routing view: what the brain makes of the prompt (``Pipeline.explain``)."""
    if not prompt or not prompt.strip():
        raise MoasError("The prompt is empty; type one to see how the brain routes it.")
    with cache.lock:
        return cache.get(model_path).explain(prompt)
