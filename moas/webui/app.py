"""The web UI's page (Gradio Blocks) and ``serve``, which ``moas webui`` calls.

One pipeline stays loaded between requests (``handlers.ModelCache``). Every event that runs the model
shares one concurrency group of size 1, so requests wait in Gradio's queue and run one at a time. A user
error shows as its one-sentence ``MoasError`` message in the page; bugs keep their traceback in the
server's log only.
"""

from __future__ import annotations

import functools
import html
import logging
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from moas.config import SampleConfig
from moas.diffusion.registry import SAMPLER_NAMES
from moas.errors import MoasError
from moas.webui import handlers as h

log = logging.getLogger(__name__)

MODEL_GROUP = "model"  # the concurrency group of every event that uses the loaded model


def user_errors(fn):
    """Raise a MoasError as a Gradio error: the page shows its sentence, and no traceback is printed."""

    @functools.wraps(fn)  # keeps the signature, so Gradio still sees a ``progress`` argument
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoasError as e:
            raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None

    return wrapper


def model_choices(models_dir: str | Path, current: str | Path | None) -> list[tuple[str, str]]:
    """(label, path) for the model picker: the folder's model files, plus ``current`` if it lies elsewhere."""
    files = [(p.name, str(p)) for p in h.list_models(models_dir)]
    if current and str(current) not in {v for _, v in files}:
        files.append((Path(current).name, str(current)))
    return files


def shown(result: h.Result) -> tuple:
    """A result as the gallery, the first image's parameters, the seed used and the per-image parameters."""
    items = [(str(p), f"seed {result.seed + i}") for i, p in enumerate(result.images)]
    return items, result.parameters[0], result.seed, result.parameters


def _settings(ui: SimpleNamespace, view: h.ModelView) -> None:
    ui.prompt = gr.Textbox(
        label="Prompt", lines=2, placeholder="1girl, red hair, blue eyes, forest", elem_id="prompt"
    )
    ui.negative = gr.Textbox(label="Negative prompt", placeholder="glasses", elem_id="negative")
    with gr.Row():
        ui.steps = gr.Slider(1, 150, value=view.steps, step=1, label="Steps", elem_id="steps")
        ui.scale = gr.Slider(1.0, 20.0, value=view.guidance_scale, step=0.5, label="Guidance scale")
    with gr.Row():
        ui.sampler = gr.Dropdown(list(SAMPLER_NAMES), value=view.sampler, label="Sampler", elem_id="sampler")
        ui.size = gr.Dropdown(
            view.sizes, value=view.sizes[0][1] if view.sizes else None, label="Size", elem_id="size"
        )
        ui.batch = gr.Slider(1, 16, value=1, step=1, label="Batch count", elem_id="batch")
    with gr.Row():
        ui.seed = gr.Number(-1, precision=0, label="Seed (-1 = random)", elem_id="seed")
        ui.randomize = gr.Checkbox(False, label="Random seed", elem_id="random")
        ui.reuse = gr.Button("Reuse the last seed", size="sm")


def _mode_tabs(ui: SimpleNamespace) -> None:
    with gr.Tabs():
        with gr.Tab("Text to image"):
            ui.generate = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Tab("Image to image"):
            ui.init_image = gr.Image(
                type="filepath", label="Input image", sources=["upload", "clipboard"], elem_id="init_image"
            )
            ui.strength = gr.Slider(
                0.0, 1.0, value=0.75, step=0.05, label="Strength (0 = the input image, 1 = ignore it)"
            )
            ui.img2img = gr.Button("Generate from the image", variant="primary", elem_id="img2img")
        with gr.Tab("Inpaint"):
            ui.editor = gr.ImageEditor(
                type="numpy",
                label="Image: paint over what to regenerate (white = regenerate, the rest is kept)",
                sources=["upload", "clipboard"],
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                transforms=(),
                format="png",  # lossless, so the kept pixels are the uploaded ones
                elem_id="editor",
            )
            ui.inpaint = gr.Button("Inpaint", variant="primary", elem_id="inpaint")
        with gr.Tab("PNG info"):
            # image_mode None and a file path: the dropped file itself, text chunks intact
            ui.png_file = gr.Image(
                type="filepath", image_mode=None, label="Drop a PNG", sources=["upload"], elem_id="png_file"
            )
            ui.png_text = gr.Textbox(label="Its parameters", lines=6, interactive=False, elem_id="png_text")
        with gr.Tab("Routing"):
            ui.explain = gr.Button("Explain the prompt", elem_id="explain")
            ui.routing = gr.Textbox(
                label="Expert routing, emotions and language", lines=12, interactive=False, elem_id="routing"
            )


def layout(models_dir: str | Path, first: Path | None, view: h.ModelView) -> SimpleNamespace:
    """The page's components (inside an open ``gr.Blocks``)."""
    ui = SimpleNamespace()
    gr.Markdown("# moas — Multiverse Origin Studio")
    with gr.Row():
        ui.model = gr.Dropdown(
            model_choices(models_dir, first),
            value=str(first) if first else None,
            label="Model",
            elem_id="model",
            scale=4,
        )
        ui.refresh = gr.Button("Refresh the list", scale=1)
    ui.status = gr.Markdown(view.status, elem_id="status")
    with gr.Row():
        with gr.Column(scale=3):
            _settings(ui, view)
            _mode_tabs(ui)
        with gr.Column(scale=2):
            ui.gallery = gr.Gallery(
                label="Images", columns=2, height=480, format="png", object_fit="contain", elem_id="gallery"
            )
            ui.seed_used = gr.Number(label="Seed used", precision=0, interactive=False, elem_id="seed_used")
            ui.parameters = gr.Textbox(
                label="PNG parameters of the selected image", lines=5, interactive=False, elem_id="parameters"
            )
    ui.results = gr.State([])  # each gallery image's parameters, in gallery order
    return ui


class Actions:
    """What the page's events run: the Gradio values in, a handler call, the Gradio values out."""

    def __init__(self, cache: h.ModelCache, models_dir: str | Path, output_dir: str | Path) -> None:
        self.cache, self.models_dir, self.output_dir = cache, models_dir, output_dir

    @user_errors
    def txt2img(
        self,
        model,
        prompt,
        negative,
        steps,
        scale,
        sampler,
        seed,
        randomize,
        size,
        batch,
        progress=gr.Progress(track_tqdm=True),
    ):
        settings = (prompt, negative, steps, scale, sampler, seed, randomize, size, batch)
        return shown(h.run_generate(self.cache, model, *settings, output_dir=self.output_dir))

    @user_errors
    def img2img(
        self,
        model,
        prompt,
        negative,
        steps,
        scale,
        sampler,
        seed,
        randomize,
        size,
        batch,
        image,
        strength,
        progress=gr.Progress(track_tqdm=True),
    ):
        if not image:
            raise MoasError("Upload the input image first, then press the button again.")
        settings = (prompt, negative, steps, scale, sampler, seed, randomize, size, batch)
        r = h.run_generate(
            self.cache, model, *settings, output_dir=self.output_dir, init_image=image, strength=strength
        )
        return shown(r)

    @user_errors
    def inpaint(
        self,
        model,
        editor,
        prompt,
        negative,
        steps,
        scale,
        seed,
        randomize,
        progress=gr.Progress(track_tqdm=True),
    ):
        settings = (prompt, negative, steps, scale, seed, randomize)
        return shown(h.run_inpaint(self.cache, model, editor, *settings, output_dir=self.output_dir))

    @user_errors
    def load(self, model):
        v = h.model_view(self.cache, model)
        size = gr.Dropdown(choices=v.sizes, value=v.sizes[0][1])
        return v.status, size, v.steps, v.guidance_scale, v.sampler

    @user_errors
    def explain(self, model, prompt):
        return h.explain(self.cache, model, prompt)

    @user_errors
    def png_info(self, path):
        return h.png_info(path)

    def refresh(self, current):
        chosen = h.default_model(self.models_dir, current)  # the newest file when none was picked yet
        value = str(chosen) if chosen else None
        return gr.Dropdown(choices=model_choices(self.models_dir, value), value=value)

    @staticmethod
    def selected(results: list[str], evt: gr.SelectData) -> str:
        return results[evt.index] if isinstance(evt.index, int) and evt.index < len(results) else ""

    @staticmethod
    def reuse(seed):
        return (-1 if seed is None else seed), False


def wire(ui: SimpleNamespace, act: Actions) -> None:
    """Connect the page's events to ``act``; the model's users share one queue slot."""
    settings = [ui.prompt, ui.negative, ui.steps, ui.scale, ui.sampler, ui.seed, ui.randomize, ui.size]
    settings.append(ui.batch)
    outputs = [ui.gallery, ui.parameters, ui.seed_used, ui.results]
    run = {"concurrency_id": MODEL_GROUP, "concurrency_limit": 1}
    ui.generate.click(act.txt2img, [ui.model, *settings], outputs, **run)
    ui.img2img.click(act.img2img, [ui.model, *settings, ui.init_image, ui.strength], outputs, **run)
    editing = [ui.model, ui.editor, ui.prompt, ui.negative, ui.steps, ui.scale, ui.seed, ui.randomize]
    ui.inpaint.click(act.inpaint, editing, outputs, **run)
    ui.model.change(act.load, ui.model, [ui.status, ui.size, ui.steps, ui.scale, ui.sampler], **run)
    ui.explain.click(act.explain, [ui.model, ui.prompt], ui.routing, **run)
    ui.refresh.click(act.refresh, ui.model, ui.model)
    ui.gallery.select(act.selected, ui.results, ui.parameters)
    ui.png_file.change(act.png_info, ui.png_file, ui.png_text)
    ui.reuse.click(act.reuse, ui.seed_used, [ui.seed, ui.randomize])


def build_app(
    models_dir: str | Path = "models",
    model: str | Path | None = None,
    output_dir: str | Path = "outputs/webui",
    device: str = "auto",
    cache: h.ModelCache | None = None,
) -> gr.Blocks:
    """The page, with the first model (``model``, else the newest in ``models_dir``) already loaded."""
    cache = cache or h.ModelCache(device)
    first = h.default_model(models_dir, model)
    try:
        if first is None:
            raise MoasError(
                f"There is no model file (.safetensors) in {models_dir}; train one with moas train, "
                "or start with --models_dir or --model."
            )
        view = h.model_view(cache, first)
    except MoasError as e:  # the page still opens; the message says what to do
        log.warning("%s", e)
        sd = SampleConfig()
        view = h.ModelView(html.escape(str(e), quote=False), [], sd.steps, sd.guidance_scale, sd.sampler)
    with gr.Blocks(title="moas web UI") as demo:
        ui = layout(models_dir, first, view)
        wire(ui, Actions(cache, models_dir, output_dir))
    return demo


def serve(
    models_dir: str | Path = "models",
    model: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    output_dir: str | Path = "outputs/webui",
    device: str = "auto",
) -> None:
    """Serve the web UI on ``host:port`` until interrupted (``moas webui``)."""
    if model and not Path(model).is_file():
        raise MoasError(f"No model file at {model}.")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's start-up self-checks, one line each
    demo = build_app(models_dir, model, output_dir, device)
    demo.queue(default_concurrency_limit=1)
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"moas web UI: models from {models_dir}, images written to {out}; Ctrl+C stops it.", flush=True)
    try:
        demo.launch(server_name=host, server_port=port, allowed_paths=[str(out)], show_error=False)
    except OSError:  # Gradio reports a port in use as an OSError
        raise MoasError(
            f"Port {port} on {host} is in use or not allowed; pick another with --port."
        ) from None
