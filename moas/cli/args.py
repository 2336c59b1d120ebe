"""The ``moas`` command line: every subcommand's flags, help texts and examples (``build_parser``).

The commands themselves live in ``moas.cli``; this module only describes the interface, so ``--help`` can
be read (and tested) without importing torch.
"""

from __future__ import annotations

import argparse
import shlex

from moas.cli.generate_args import EPILOG_GENERATE, _add_generate
from moas.demo import DEMO_PROMPT, demo_commands
from moas.diffusion.registry import SAMPLER_NAMES

EPILOG_TRAIN = """examples:
  moas train --data_dir data/demo/train --profile cpu_tiny          # the demo on a CPU
  moas train --data_dir ./data/train --epochs 260 --profile rtx3060_12gb
  moas train --data_dir ./data/train --auto_resume                  # continue after a crash
  moas train --profile original --dry-run                          # print the resolved config and exit
  moas train --data_dir ./data/train --sample_prompts prompts.txt   # fixed prompts for the sample grids
  moas train --init_from models/best_model.safetensors --data_dir ./data/alice \
      --checkpoint_dir checkpoints/alice --save_path models/alice.safetensors   # fine-tune on a new folder
Settings resolve as: profile < --config FILE < MOAS_<SECTION>_<FIELD> variables (.env) < flags."""


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data_dir",
        help="folder of training images (+ .txt captions with the same stem), searched recursively",
    )
    p.add_argument("--val_dir", help="optional folder of validation images")
    p.add_argument(
        "--epochs", type=int, help="passes over the data (the schedule's warm-up and restarts scale with it)"
    )
    p.add_argument("--batch_size", type=int, help="images per optimizer micro-step")
    p.add_argument("--lr", type=float, help="peak learning rate after warm-up")
    p.add_argument("--resolution", type=int, help="training image side in pixels (multiple of 8)")
    p.add_argument(
        "--save_path",
        help="where the final model for generation is written (default models/best_model.safetensors)",
    )
    p.add_argument("--checkpoint_dir", help="folder for epoch checkpoints (default checkpoints/)")
    p.add_argument(
        "--auto_resume",
        action="store_true",
        help="continue from the newest valid checkpoint in --checkpoint_dir",
    )
    p.add_argument(
        "--init_from",
        metavar="MODEL",
        help="fine-tune: start a new run from this model file's weights (new optimizer, schedule and run "
        "folder); its architecture and text encoder must match this run's",
    )
    p.add_argument(
        "--stage",
        choices=["all", "sr"],
        default="all",
        help="all: the generator with every side network the config turns on (the super-resolution stage "
        "with sr.train); sr: only the super-resolution stage, added to the model at --init_from (else "
        "--save_path) and written to --save_path; --max_steps or --epochs say how long",
    )
    p.add_argument("--profile", help="hardware profile from configs/: cpu_tiny, rtx3060_12gb or original")
    p.add_argument("--config", help="a TOML file whose values override the profile")
    p.add_argument("--seed", type=int, help="seed for Python, NumPy and torch")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max_steps", type=int, help="stop after this many optimizer steps (for smoke tests)")
    p.add_argument(
        "--save_every_steps",
        type=int,
        help="also write checkpoint_<step>.pt every N optimizer steps (0 = only per epoch)",
    )
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="print the resolved config and exit",
    )
    p.add_argument(
        "--sample_prompts",
        help="file of prompts for the periodic sample grids: one per line, optional --seed N --steps N --scale X",
    )
    p.add_argument(
        "--val_fraction",
        type=float,
        help="without --val_dir: share of the training images held out for validation (default 0.05)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars and no live dashboard (bars and the in-place dashboard need a terminal; "
        "redirected output gets plain dashboard lines instead)",
    )
    _add_brain_flags(p)


def _add_brain_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--conditioning",
        choices=["moas", "text"],
        help="moas: the full conditioning brain (default); text: text-only conditioning, for ablation",
    )
    p.add_argument(
        "--gnn_version",
        type=int,
        choices=[1, 2, 3, 4],
        help="which EnhancedGNN is registered as the active graph module (default 4)",
    )
    p.add_argument(
        "--tag_routing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="route each caption tag (not the whole prompt) over the 14 experts, biased by the tag's "
        "keyword category (brain.tag_routing; default off, see docs/brain.md)",
    )
    p.add_argument(
        "--aux_targets",
        type=float,
        metavar="WEIGHT",
        help="weight of the experts' image targets (palette for colour, edges for line art, ...); "
        "0 = off (brain.aux_targets; default 0)",
    )
    p.add_argument(
        "--expert_tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="give every expert and the GNN its own cross-attention token (brain.expert_tokens; default off)",
    )


BRAIN_FLAGS = ("conditioning", "gnn_version", "tag_routing", "aux_targets", "expert_tokens")


def brain_overrides(a: argparse.Namespace) -> dict:
    """The ``[brain]`` settings given on the command line (flags left out are not set)."""
    return {k: getattr(a, k) for k in BRAIN_FLAGS if getattr(a, k, None) is not None}


EPILOG_EDIT = """examples:
  moas edit --image photo.png --mask mask.png --prompt "1girl, blue hair" --output edited.png
  moas edit --image panel.png --outpaint 64,64,0,0 --prompt "forest" --output wide.png

The mask is an image of the same size: white = regenerate, black = keep. Kept pixels are copied
bit for bit. The seam metrics (32-px overlap MSE and Sobel attention-edge loss) are printed."""


def _add_edit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="models/best_model.safetensors", help="model file written by training")
    p.add_argument("--image", required=True, help="the image to edit (PNG/JPG/WEBP/BMP)")
    p.add_argument("--mask", help="same-size mask image: white = regenerate, black = keep")
    p.add_argument(
        "--outpaint", help="extend the canvas by L,R,T,B pixels and fill the new border, e.g. 32,32,0,0"
    )
    p.add_argument("--prompt", required=True, help="what to draw in the regenerated region")
    p.add_argument("--negative_prompt", default="", help="what to steer away from")
    p.add_argument("--output", default="edited.png", help="PNG path for the result")
    p.add_argument(
        "--steps", type=int, default=None, help="reverse-diffusion steps (default from the model's config)"
    )
    p.add_argument("--resample", type=int, default=3, help="RePaint resampling jumps per step (1 = none)")
    p.add_argument("--guidance_scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument(
        "--quality_enhance",
        choices=["full", "resolution", "detail", "color", "none"],
        default=None,
        help="how the filled region is brought to the canvas size (default: the model's, full)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--style",
        help="artist style learned from a data folder (model trained with data.extract_style = true)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


EPILOG_INSPECT = """examples:
  moas inspect --profile rtx3060_12gb            # parameter count of every component
  moas inspect --model models/best_model.safetensors --graph   # a trained model, with its DataFlow graph
  moas inspect --profile cpu_tiny --conditioning text"""


EPILOG_PREPARE = """examples:
  moas prepare --data_dir data/train                                # report only
  moas prepare --data_dir data/train --move_rejects data/rejected   # move rejects (+ captions) away
Checks (the original's thresholds): long edge >= 512, short edge >= 256, aspect 0.33-3.0, colour std > 15,
Laplacian variance > 30, contrast > 20, > 100 colours when near black/white, MD5 duplicates, unreadable
files. Originals are never deleted."""

EPILOG_DOWNLOAD = """examples:
  moas download --tags "1girl solo" --out data/danbooru             # up to 3,500 filtered images
  moas download --tags "landscape" --out data/bg --target 500 --min_score 10
Credentials (optional) come from .env: DANBOORU_LOGIN and DANBOORU_API_KEY. Rerun the same command to
resume after an interruption; a full folder is skipped, an over-full one is trimmed into OUT/.trimmed/."""


def _add_quality_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min_long_edge", type=int, default=512, help="minimum long edge in pixels (512)")
    p.add_argument("--min_short_edge", type=int, default=256, help="minimum short edge in pixels (256)")


def _add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_dir", required=True, help="folder of images to check (searched recursively)")
    p.add_argument("--move_rejects", help="move rejected images and their captions into this folder")
    p.add_argument("--report", help="JSON report path (default logs/prepare_report.json)")
    _add_quality_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_download(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tags", default="", help="Danbooru tag query, e.g. '1girl solo'")
    p.add_argument("--out", default="data/danbooru", help="output folder (images + .txt captions)")
    p.add_argument("--target", type=int, default=3500, help="images wanted in the folder (3500)")
    p.add_argument("--min_score", type=int, default=5, help="minimum Danbooru score (5)")
    p.add_argument("--max_pages", type=int, default=1000, help="stop after this many API pages")
    p.add_argument(
        "--base_url", default="https://danbooru.donmai.us", help="API root (a mirror or a local test server)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="read timeout per request in seconds")
    p.add_argument("--retries", type=int, default=5, help="retries per request (421/429/5xx, timeouts)")
    p.add_argument("--max_file_mb", type=float, default=50.0, help="largest file accepted, in MB")
    p.add_argument("--no_anime_check", action="store_true", help="skip the anime-validation keyword filter")
    p.add_argument("--report", help="JSON report path (default logs/download_report.json)")
    _add_quality_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_tune(t: argparse.ArgumentParser) -> None:
    _add_train(t)
    t.add_argument("--trials", type=int, default=10, help="number of trials (the first 5 are random)")
    t.add_argument(
        "--budget_minutes", type=float, default=60.0, help="start no trial after this many minutes"
    )
    t.add_argument("--steps", type=int, default=50, help="optimizer steps per trial")
    t.add_argument("--out", default="tune", help="folder for the trials and tune_results.json")
    t.add_argument("--best_config", default="configs/tuned.toml", help="where the best settings are written")


def _add_make_data(m: argparse.ArgumentParser) -> None:
    m.add_argument("--out", default="data/demo", help="output folder (images go to OUT/train/<artist>/)")
    m.add_argument("--n_images", type=int, default=1200, help="number of images")
    m.add_argument(
        "--size",
        type=int,
        default=128,
        help="image side in pixels (128: the cpu_tiny cascade draws 32 px and its super-resolution stage learns "
        "the 4x detail from these)",
    )
    m.add_argument("--seed", type=int, default=0, help="seed (same seed → identical files)")
    m.add_argument(
        "--sequences",
        type=int,
        default=0,
        help="also write this many 3-4 panel sequences (seqNNN_p<k>.png: one character and background, "
        "varying expression and framing) for panel training; the ordinary images do not change",
    )
    m.add_argument(
        "--sequence_tag_drop",
        type=float,
        default=0.0,
        metavar="P",
        help="in panels 2.. of each sequence, drop the '<colour> hair' and '<colour> eyes' caption tags, "
        "each with probability P (brief later-panel descriptions, so the panel memory has something to "
        "carry over); 0 = full captions",
    )
    m.add_argument(
        "--scene",
        choices=("one", "two"),
        default="one",
        help="one = one girl per image; two = two girls side by side, each with her own hair and eye "
        "colour, captioned per side ('left: red hair, right: blonde hair, ...'), with some (left hair, "
        "right hair) pairs held out of training to test attribute binding (even --size >= 32)",
    )


def _add_demo(d: argparse.ArgumentParser) -> None:
    d.add_argument(
        "--data", default="data/demo", help="where the demo data is drawn (its train/ is trained on)"
    )
    d.add_argument(
        "--profile", default="cpu_tiny", help="the training profile (cpu_tiny: ~10 minutes on 2 cores)"
    )
    d.add_argument("--prompt", default=DEMO_PROMPT, help="the prompt generated")
    d.add_argument("--output", default="result.png", help="where the generated image is written")


EPILOG_DEMO = (
    "It runs, printing each command first:\n"
    + "".join(
        f"  moas {shlex.join(argv)}\n"
        for _, argv in demo_commands("data/demo", "cpu_tiny", DEMO_PROMPT, "result.png")
    )
    + "then a table of where the time went and the disk the demo's folders take (also in demo_timings.json)."
)


def _add_eval(e: argparse.ArgumentParser) -> None:
    e.add_argument("--model", default="models/best_model.safetensors", help="model file to evaluate")
    e.add_argument(
        "--data_dir",
        default="data/demo",
        help="any folder of captioned images (the one the model trained on gives held-out prompts); on the "
        "demo data (with manifest.json) the attribute table (two-character sets: the binding table) is "
        "printed too",
    )
    e.add_argument("--n", type=int, default=48, help="demo data: images per split (held-out and seen)")
    e.add_argument(
        "--n_folder",
        type=int,
        default=64,
        help="images drawn from held-out captions for tag adherence, KID and memorisation",
    )
    e.add_argument("--steps", type=int, default=None, help="sampler steps (default from the model's config)")
    e.add_argument(
        "--guidance_scale", type=float, default=None, help="guidance scale (default from the model's config)"
    )
    e.add_argument("--sampler", choices=SAMPLER_NAMES, default=None)
    e.add_argument("--seed", type=int, default=1234, help="seed for the evaluation prompts and images")
    e.add_argument("--json", help="write the full result here (default: eval.json next to the model)")
    e.add_argument("--save_images", help="also write every evaluated image to this folder")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


EPILOG_CAPTION = """What it does:
  1. trains a small tag model from scratch on the folder's captioned images (comma-separated tags in
     .txt/.caption files; needs 10 captioned images and 2 tags used on 3 or more), a few minutes on a
     CPU for a few thousand images, or reuses the one in DATA_DIR/.moas/ when those are unchanged;
  2. writes <stem>.txt for each image with no caption file: the tags it sees with probability
     >= --threshold, most likely first.
Existing .txt and .caption files are never overwritten; an image with no tag above the threshold stays
uncaptioned. The captions it writes are listed in DATA_DIR/.moas/auto_captions.json and never train the
tag model. Read a few before training on them.
examples:
  moas caption --data_dir data/train
  moas caption --data_dir data/train --threshold 0.7        # fewer, surer tags"""


def _add_caption(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--data_dir", required=True, help="folder of images, some captioned (searched recursively)"
    )
    c.add_argument("--threshold", type=float, default=0.5, help="lowest tag probability written (0.5)")
    c.add_argument("--max_tags", type=int, default=20, help="at most this many tags per caption (20)")
    c.add_argument("--seed", type=int, default=0, help="seed of the tag model's split and training (0)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_inspect(i: argparse.ArgumentParser) -> None:
    i.add_argument("--model", help="a model file or checkpoint to inspect (instead of a profile)")
    i.add_argument("--profile", help="hardware profile from configs/ (default cpu_tiny)")
    i.add_argument("--config", help="a TOML file whose values override the profile")
    i.add_argument("--graph", action="store_true", help="also print the DataFlow graph in execution order")
    _add_brain_flags(i)


EPILOG_WEBUI = """examples:
  moas webui                                   # http://127.0.0.1:7860, models from ./models
  moas webui --models_dir runs/exp1/models --port 7861
  moas webui --listen                          # also reachable from other machines on the network
The model stays loaded between requests; requests queue and run one at a time."""


def _add_webui(w: argparse.ArgumentParser) -> None:
    w.add_argument(
        "--models_dir", default="models", help="folder whose .safetensors model files the picker offers"
    )
    w.add_argument("--model", help="the model to load first (default: the newest file in --models_dir)")
    w.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    w.add_argument(
        "--listen",
        action="store_true",
        help="bind to 0.0.0.0 so other machines can connect (default: 127.0.0.1, this machine only)",
    )
    w.add_argument("--output_dir", default="outputs/webui", help="where generated PNGs are written")
    w.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


# command → (adds its flags, one-line help, examples shown under its --help)
SUBCOMMANDS = {
    "train": (_add_train, "train a model on a folder of images", EPILOG_TRAIN),
    "generate": (_add_generate, "generate images from a prompt", EPILOG_GENERATE),
    "doctor": (
        _add_train,
        "check devices, memory, disk, data, text encoder and checkpoints (writes logs/diagnosis.log)",
        "examples:\n  moas doctor --profile rtx3060_12gb --data_dir ./data/train",
    ),
    "tune": (
        _add_tune,
        "search lr, batch size, weight decay and betas with short trainings",
        "examples:\n  moas tune --data_dir ./data/train --val_dir ./data/val --trials 20 --budget_minutes 120\n"
        "  moas tune --data_dir data/demo/train --trials 3 --steps 20 --best_config configs/tuned.toml",
    ),
    "edit": (_add_edit, "inpaint a masked region or outpaint the borders", EPILOG_EDIT),
    "demo": (_add_demo, "the first run: draw the demo data, train, generate, evaluate, time it", EPILOG_DEMO),
    "make-data": (
        _add_make_data,
        "draw the built-in demo data set (anime characters with tag captions)",
        None,
    ),
    "prepare": (_add_prepare, "run the quality filters over a local image folder", EPILOG_PREPARE),
    "download": (
        _add_download,
        "download filtered, captioned training images from Danbooru",
        EPILOG_DOWNLOAD,
    ),
    "caption": (
        _add_caption,
        "tag uncaptioned images with a tag model trained on the captioned ones",
        EPILOG_CAPTION,
    ),
    "eval": (
        _add_eval,
        "measure a model on a folder: tag adherence, KID and memorisation by the folder's own tag model "
        "(and the attribute table on the demo data)",
        None,
    ),
    "inspect": (_add_inspect, "parameter counts of every component and the DataFlow graph", EPILOG_INSPECT),
    "webui": (_add_webui, "a local web UI: generate, image-to-image, inpainting, PNG info", EPILOG_WEBUI),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moas",
        description="Multiverse Origin Studio: train an anime/manga text-to-image model from scratch on your images, then generate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'moas COMMAND --help' for the flags of each command. The original spellings "
        "'moas --train ...' and 'moas --generate ...' also work.",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_flags, help_text, epilog) in SUBCOMMANDS.items():
        extra = {"epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter} if epilog else {}
        add_flags(sub.add_parser(name, help=help_text, **extra))
    return parser


def translate_original_flags(argv: list[str]) -> list[str]:
    """``moas --train ...`` → ``moas train ...`` (the original system's spelling)."""
    for flag, cmd in (("--train", "train"), ("--generate", "generate")):
        if flag in argv:
            rest = [a for a in argv if a != flag]
            return [cmd, *rest]
    return argv
