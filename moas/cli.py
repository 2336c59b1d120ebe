"""The ``moas`` command: train, generate, make-data, eval (and the original ``--train``/``--generate``).

User errors end in one sentence on stderr and a non-zero exit; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from moas.cli_args import brain_overrides, build_parser, translate_original_flags
from moas.errors import DataError, MoasError

log = logging.getLogger("moas")


def _train_overrides(a: argparse.Namespace) -> dict:
    o: dict = {}

    def put(section: str, key: str, value) -> None:
        if value is not None:
            o.setdefault(section, {})[key] = value

    put("data", "data_dir", a.data_dir)
    put("data", "val_dir", a.val_dir)
    put("data", "resolution", a.resolution)
    put("train", "epochs", a.epochs)
    put("train", "batch_size", a.batch_size)
    put("train", "lr", a.lr)
    put("train", "save_path", a.save_path)
    put("train", "checkpoint_dir", a.checkpoint_dir)
    put("train", "seed", a.seed)
    put("train", "max_steps", a.max_steps)
    put("train", "save_every_steps", a.save_every_steps)
    put("monitor", "sample_prompts", a.sample_prompts)
    put("monitor", "val_fraction", a.val_fraction)
    if a.auto_resume:
        put("train", "auto_resume", True)
    put("train", "init_from", a.init_from)
    put("resources", "device", a.device)
    for key, value in brain_overrides(a).items():
        put("brain", key, value)
    return o


def _config(a: argparse.Namespace):
    """The resolved config and, when no profile was named, the machine's profile choice (with its reason).

    A profile named by --profile or MOAS_PROFILE (.env included) always wins over the machine's."""
    from moas.config import deep_merge, load_config, load_dotenv_file

    load_dotenv_file()
    choice = None
    if not a.profile and not os.environ.get("MOAS_PROFILE"):
        from moas.device import detect_profile

        choice = detect_profile()
    overrides = _train_overrides(a)
    if choice is not None:
        overrides = deep_merge(choice.overrides, overrides)  # --device still wins
    cfg = load_config(choice.profile if choice else a.profile, a.config, overrides)
    return cfg, choice


def _plans_text(cfg) -> str:
    """The dry-run's plans as TOML comments (the printed config stays a valid --config file)."""
    from moas.train.plans import disk_plan, memory_plan

    if cfg.resources.device == "cpu":
        text = "memory plan: none needed, this profile trains on the CPU (RAM is checked at start)"
    else:
        text = memory_plan(cfg).describe() + "\n  (the run applies this plan when it starts on a CUDA GPU)"
    text += "\n" + disk_plan(cfg).describe()
    return "\n".join(f"# {line}" for line in text.splitlines())


def _plan_for_gpu(cfg):
    """On a CUDA GPU: the memory plan applied (micro-batch, accumulation, checkpointing, enhancer batch)."""
    from moas.device import resolve_device

    if resolve_device(cfg.resources.device).type != "cuda":
        return cfg
    import torch

    from moas.train.plans import apply_memory_plan, memory_plan, plan_budget_gb

    free_gb = torch.cuda.mem_get_info(resolve_device(cfg.resources.device))[0] / 2**30
    budget = plan_budget_gb(cfg.resources.max_vram_gb, free_gb)
    if budget < cfg.resources.max_vram_gb:  # less is free than the plan would fill
        log.warning(
            "Only %.1f GB of the GPU's memory is free now (other programs hold the rest, e.g. the display); "
            "the memory plan uses that instead of resources.max_vram_gb = %.1f.",
            free_gb,
            cfg.resources.max_vram_gb,
        )
    plan = memory_plan(cfg, budget)
    for line in plan.describe().splitlines():
        log.info(line)
    if not plan.fits:
        log.warning("The memory plan exceeds resources.max_vram_gb; out-of-memory recovery will step down.")
    return apply_memory_plan(cfg, plan)


def cmd_train(a: argparse.Namespace) -> int:
    cfg, choice = _config(a)
    if a.dry_run:
        if choice is not None:
            print(f"# {choice.notice()}")
        print(cfg.to_toml())
        print(_plans_text(cfg))
        return 0
    if choice is not None:
        print(f"moas: {choice.notice()}", file=sys.stderr)
    from moas.config import lr_batch_warning
    from moas.doctor import run_checks
    from moas.monitor.logs import setup_logging
    from moas.train.distributed import context_from_env, shutdown_distributed
    from moas.train.loop import train

    main_rank = context_from_env().is_main
    setup_logging(cfg.train.log_dir if main_rank else None, a.verbose, quiet_console=not main_rank)
    if cfg.monitor.sample_prompts:  # a bad prompts file fails before any data is read
        from moas.inference.prompt_file import read_sample_prompts

        read_sample_prompts(cfg.monitor.sample_prompts)
    if main_rank:
        run_checks(cfg, quick=True)  # writes logs/diagnosis.log; problems are warnings here
        if (warning := lr_batch_warning(cfg)) is not None:
            log.warning(warning)
    if a.stage == "sr":
        from moas.train.sr_run import train_sr

        print(
            f"Model with its super-resolution stage: {train_sr(cfg, progress=sys.stderr.isatty() and not a.quiet)}"
        )
        return 0
    cfg = _plan_for_gpu(cfg)
    # tqdm bars redraw with carriage returns, so they only go to a terminal; a log file gets the
    # dashboard's plain lines instead.
    tty = sys.stderr.isatty()
    try:
        if tty and not a.quiet:
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():
                result = train(cfg, progress=True, dashboard=True)
        else:
            result = train(cfg, progress=False, dashboard=not a.quiet)
    finally:
        shutdown_distributed()
    if not main_rank:
        return 0
    print(
        f"Trained {result.epochs_done} epochs ({result.global_step} steps); model: {result.model_path}; "
        f"TensorBoard: tensorboard --logdir {Path(cfg.train.run_dir)}"
    )
    return 0


def _load_pipeline(model: str, device: str):
    from moas.device import resolve_device
    from moas.inference.pipeline import Pipeline

    return Pipeline.from_file(model, resolve_device(device))


def _generate_request(a: argparse.Namespace):
    from moas.inference.generate import GenerateRequest

    req = GenerateRequest(
        prompt=a.prompt or "",
        negative_prompt=a.negative_prompt,
        num_images=a.num_images,
        seed=a.seed,
        width=a.width,
        height=a.height,
        style=a.style,
        allow_nsfw=a.allow_nsfw,
        keep_best=a.keep_best,
        quality_enhance=a.quality_enhance,
        upscaler=a.upscaler,
        panels=a.panels,
        init_image=a.init_image,
        strength=a.strength,
    )
    if a.steps is not None:  # checked before loading anything; unset ones come from the model
        req.steps = a.steps
    if a.guidance_scale is not None:
        req.guidance_scale = a.guidance_scale
    return req


def _generate_batch(a: argparse.Namespace, req, progress: bool) -> int:
    from moas.inference.batch import generate_batch, read_batch

    if a.prompt or a.panels is not None:
        raise MoasError("--from_file gives the prompts; it cannot be combined with --prompt or --panels.")
    req.prompt = "batch"  # each line replaces it
    lines = read_batch(a.from_file, req, a.steps is not None, a.guidance_scale is not None)
    pipe = _load_pipeline(a.model, a.device)
    paths = generate_batch(pipe, lines, a.output, Path(a.model).stem, a.sampler, progress)
    for p in paths:
        print(f"wrote {p}")
    print(f"{len(lines)} prompts from {a.from_file}, {len(paths)} images")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from moas.inference.generate import generate, validate_request

    req = _generate_request(a)
    progress = not a.quiet and sys.stderr.isatty()
    if a.from_file:
        return _generate_batch(a, req, progress)
    validate_request(req)
    pipe = _load_pipeline(a.model, a.device)
    if a.explain:
        print(pipe.explain(req.prompt))
    req.steps, req.guidance_scale, req.sampler = pipe.settings(a.steps, a.guidance_scale, a.sampler)
    if req.panels is not None:
        from moas.inference.generate import describe_metric, generate_panels

        paths, report = generate_panels(pipe, req, a.output, Path(a.model).stem, progress=progress)
        for p in paths:
            print(f"wrote {p}")
        print(describe_metric(report))
        return 0
    paths = generate(pipe, req, a.output, Path(a.model).stem, progress=progress)
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_edit(a: argparse.Namespace) -> int:
    from moas.inference.edit import EditRequest, edit, parse_outpaint

    if (a.steps is not None and not 1 <= a.steps <= 1000) or a.resample < 1:
        raise MoasError("--steps must be between 1 and 1000 and --resample at least 1.")
    req = EditRequest(
        image=a.image,
        prompt=a.prompt,
        mask=a.mask,
        outpaint=parse_outpaint(a.outpaint),
        negative_prompt=a.negative_prompt,
        seed=a.seed,
        resample=a.resample,
        quality_enhance=a.quality_enhance,
    )
    if not req.mask and not any(req.outpaint):
        raise MoasError("Give --mask (white = regenerate) or --outpaint L,R,T,B, or both.")
    pipe = _load_pipeline(a.model, a.device)
    pipe.set_style(a.style)
    req.steps, req.guidance_scale, _ = pipe.settings(a.steps, a.guidance_scale)
    m = edit(pipe, req, a.output, progress=not a.quiet)
    print(
        f"wrote {a.output}; seam overlap MSE {m['overlap_mse']:.5f}, Sobel attention-edge loss "
        f"{m['attention_edge']:.5f}, seam loss {m['seam_loss']:.5f}; kept pixels identical: "
        f"{'yes' if m['kept_pixels_identical'] else 'NO'}"
    )
    return 0


def cmd_make_data(a: argparse.Namespace) -> int:
    from moas.data.synthetic import generate_demo_dataset

    if a.n_images < 1:
        raise MoasError("--n_images must be at least 1.")
    if a.sequences < 0:
        raise MoasError("--sequences must be 0 or more.")
    if not 0.0 <= a.sequence_tag_drop <= 1.0:
        raise MoasError("--sequence_tag_drop must be between 0 and 1.")
    manifest = generate_demo_dataset(
        a.out,
        n_images=a.n_images,
        size=a.size,
        seed=a.seed,
        sequences=a.sequences,
        sequence_tag_drop=a.sequence_tag_drop,
        scene=a.scene,
    )
    n_seq = sum(len(s["panels"]) for s in manifest.get("sequences", []))
    print(
        f"wrote {manifest['n_images']} images"
        + (f" and {a.sequences} sequences ({n_seq} panels)" if a.sequences else "")
        + f" to {Path(a.out) / 'train'} and {Path(a.out) / 'manifest.json'}"
    )
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from moas.demo import run_demo

    return run_demo(main, a.data, a.profile, a.prompt, a.output)


def cmd_eval(a: argparse.Namespace) -> int:
    from moas.eval.evaluate import run_eval, summary, write_json
    from moas.eval.folder_cli import eval_folder, image_folder
    from moas.eval.folder_eval import summary_text
    from moas.eval.validate import find_demo_manifest

    if a.n < 1:
        raise MoasError("--n must be at least 1.")
    if not Path(a.data_dir).is_dir():
        raise DataError(f"Data folder {a.data_dir} does not exist or is not a folder.")
    pipe = _load_pipeline(a.model, a.device)
    progress = not a.quiet and sys.stderr.isatty()  # tqdm redraws need a terminal
    common = {"steps": a.steps, "guidance_scale": a.guidance_scale, "sampler": a.sampler, "seed": a.seed}
    result: dict = {}
    if find_demo_manifest(a.data_dir) is not None:  # the demo's attribute table stays on the demo
        result = run_eval(
            pipe, a.data_dir, n_per_split=a.n, progress=progress, image_dir=a.save_images, **common
        )
        print(summary(result))
    folder = image_folder(a.data_dir)
    result["folder"] = eval_folder(pipe, folder, a.n_folder, progress=progress, **common)
    print(summary_text(result["folder"]))
    out = Path(a.json) if a.json else Path(a.model).with_name("eval.json")
    write_json(result, out)
    print(f"full result: {out}")
    return 0


def cmd_caption(a: argparse.Namespace) -> int:
    from moas.eval.caption import caption_folder, describe

    result = caption_folder(
        a.data_dir, a.seed, a.threshold, progress=not a.quiet and sys.stderr.isatty(), max_tags=a.max_tags
    )
    print(describe(result))
    return 0


def _thresholds(a: argparse.Namespace):
    from moas.data.filters import QualityThresholds

    if a.min_long_edge < 1 or a.min_short_edge < 1:
        raise MoasError("--min_long_edge and --min_short_edge must be at least 1.")
    return QualityThresholds(min_long_edge=a.min_long_edge, min_short_edge=a.min_short_edge)


def cmd_prepare(a: argparse.Namespace) -> int:
    from moas.data.filters import prepare_folder

    report_path = Path(a.report or "logs/prepare_report.json")
    r = prepare_folder(a.data_dir, a.move_rejects, report_path, _thresholds(a), progress=not a.quiet)
    reasons = ", ".join(f"{k} {v}" for k, v in r["by_reason"].items()) or "none"
    moved = f"; rejects moved to {a.move_rejects}" if a.move_rejects else ""
    print(f"{r['kept']} of {r['total']} images pass; rejected: {reasons}{moved}; report: {report_path}")
    return 0


def cmd_download(a: argparse.Namespace) -> int:
    from moas.data.download import DanbooruDownloader, DownloadSettings

    if a.target < 1 or a.max_pages < 1 or a.retries < 0 or a.timeout <= 0 or a.max_file_mb <= 0:
        raise MoasError(
            "--target and --max_pages must be at least 1, --retries 0 or more, --timeout and --max_file_mb positive."
        )
    settings = DownloadSettings(
        tags=a.tags,
        target=a.target,
        base_url=a.base_url,
        min_score=a.min_score,
        require_anime_keyword=not a.no_anime_check,
        max_pages=a.max_pages,
        timeout=(min(10.0, a.timeout), a.timeout),
        retries=a.retries,
        max_file_bytes=int(a.max_file_mb * 1024 * 1024),
        thresholds=_thresholds(a),
    )
    dl = DanbooruDownloader(a.out, settings)
    report_path = Path(a.report or "logs/download_report.json")
    try:
        rep = dl.run(progress=not a.quiet)
    finally:
        dl.write_report(report_path)
    if rep.skipped_run:
        print(
            f"{a.out} already meets the target of {a.target} images"
            + (f"; trimmed {rep.trimmed}" if rep.trimmed else "")
            + "."
        )
        return 0
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(rep.failures.items())) or "none"
    print(
        f"examined {rep.total} posts: {rep.downloaded} downloaded, {rep.present} already present, "
        f"{sum(rep.failures.values())} skipped ({reasons}); report: {report_path}"
    )
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    from moas.monitor.logs import setup_logging
    from moas.train.hpo import results_table, tune

    cfg, choice = _config(a)
    if choice is not None:
        print(f"moas: {choice.notice()}", file=sys.stderr)
    setup_logging(cfg.train.log_dir, a.verbose)
    opt = tune(cfg, a.trials, a.budget_minutes, a.steps, a.out, a.best_config, a.seed or 0, progress=False)
    print(results_table(opt))
    print(f"best settings: {a.best_config} (use: moas train --config {a.best_config}); all trials: {a.out}")
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    from moas.doctor import format_table, profile_check, run_checks
    from moas.monitor.logs import setup_logging

    cfg, choice = _config(a)
    setup_logging(cfg.train.log_dir, a.verbose)
    results = [profile_check(cfg, choice), *run_checks(cfg)]
    print(format_table(results))
    return 1 if any(c.status == "fail" for c in results) else 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from moas.studio import MultiverseOriginStudioAI

    if a.model:
        if a.profile or a.config or brain_overrides(a):
            raise MoasError("--model cannot be combined with --profile, --config or the brain flags.")
        system = MultiverseOriginStudioAI.from_file(a.model)
    else:
        from moas.config import load_config

        o = {"brain": brain_overrides(a)}
        system = MultiverseOriginStudioAI.from_config(load_config(a.profile, a.config, o))
    print(system.describe(graph=a.graph))
    return 0


def cmd_webui(a: argparse.Namespace) -> int:
    try:
        from moas.webui.app import serve
    except ImportError as e:
        raise MoasError(
            f"The web UI needs its extra packages ({e.name} is missing); install them with "
            'pip install -e ".[webui]".'
        ) from None
    if not 1 <= a.port <= 65535:
        raise MoasError("--port must be between 1 and 65535.")
    serve(
        models_dir=a.models_dir,
        model=a.model,
        host="0.0.0.0" if a.listen else "127.0.0.1",
        port=a.port,
        output_dir=a.output_dir,
        device=a.device,
    )
    return 0


COMMANDS = {
    "tune": cmd_tune,
    "doctor": cmd_doctor,
    "train": cmd_train,
    "generate": cmd_generate,
    "make-data": cmd_make_data,
    "demo": cmd_demo,
    "eval": cmd_eval,
    "caption": cmd_caption,
    "prepare": cmd_prepare,
    "download": cmd_download,
    "inspect": cmd_inspect,
    "edit": cmd_edit,
    "webui": cmd_webui,
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not sys.stderr.isatty():  # a log file: redraw progress bars rarely (read by tqdm at import)
        os.environ.setdefault("TQDM_MININTERVAL", "15")
    argv = translate_original_flags(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    if a.command not in ("train", "doctor", "tune"):
        from moas.monitor.logs import setup_logging

        setup_logging(None, a.verbose)
    try:
        return COMMANDS[a.command](a)
    except MoasError as e:
        stopped = getattr(e, "signum", None)  # a graceful stop on SIGINT/SIGTERM, not a failure
        print(f"moas: {e}" if stopped else f"moas: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("moas: interrupted", file=sys.stderr)
        return 130
