"""The ``moas`` command's entry point: the parser, the table of subcommands, one sentence for a user's error;
and the small commands (``demo``, ``doctor``, ``inspect``, ``webui``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from moas.cli.args import brain_overrides, build_parser, translate_original_flags
from moas.cli.data import cmd_caption, cmd_download, cmd_eval, cmd_make_data, cmd_prepare
from moas.cli.generate import cmd_edit, cmd_generate
from moas.cli.train import cmd_train, cmd_tune, run_config
from moas.errors import MoasError

log = logging.getLogger("moas")


def cmd_demo(a: argparse.Namespace) -> int:
    from moas.demo import run_demo

    return run_demo(main, a.data, a.profile, a.prompt, a.output)


def cmd_doctor(a: argparse.Namespace) -> int:
    from moas.doctor import format_table, profile_check, run_checks
    from moas.monitor.logs import setup_logging

    cfg, choice = run_config(a)
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
