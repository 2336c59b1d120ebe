"""``moas train`` and ``moas tune``: the config from the flags, the memory plans of ``--dry-run``, and the
run (or the super-resolution stage alone with ``--stage sr``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from moas.cli.args import brain_overrides

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
    put("train", "stage", None if getattr(a, "stage", "all") == "all" else a.stage)
    put("resources", "device", a.device)
    for key, value in brain_overrides(a).items():
        put("brain", key, value)
    return o


def run_config(a: argparse.Namespace):
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
    cfg, choice = run_config(a)
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
    if cfg.train.stage == "all":  # the stage alone leaves the generator's batch as it is
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


def cmd_tune(a: argparse.Namespace) -> int:
    from moas.monitor.logs import setup_logging
    from moas.train.hpo import results_table, tune

    cfg, choice = run_config(a)
    if choice is not None:
        print(f"moas: {choice.notice()}", file=sys.stderr)
    setup_logging(cfg.train.log_dir, a.verbose)
    opt = tune(cfg, a.trials, a.budget_minutes, a.steps, a.out, a.best_config, a.seed or 0, progress=False)
    print(results_table(opt))
    print(f"best settings: {a.best_config} (use: moas train --config {a.best_config}); all trials: {a.out}")
    return 0
