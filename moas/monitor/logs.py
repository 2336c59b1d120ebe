"""The run's log files and console logging (the original's four log files)."""

from __future__ import annotations

import logging
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(
    log_dir: str | Path | None = None, verbose: bool = False, quiet_console: bool = False
) -> None:
    """Console at INFO (WARNING for noisy libraries) and, with ``log_dir``, the original's four log files.

    ``main.log``: everything at INFO (DEBUG with --verbose). ``error.log``: errors with context and
    recovery status (out of memory, emergency checkpoints, crashes with traceback). ``performance.log``:
    one line per optimizer step with timing and live resources (logger ``moas.performance``, not shown on
    the console). ``diagnosis.log``: the start-up health checks (logger ``moas.diagnosis``, also
    ``moas doctor``). ``quiet_console`` shows only warnings (non-zero DDP ranks).
    """
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_moas", False):
            root.removeHandler(h)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    console.setLevel(logging.WARNING if quiet_console else logging.DEBUG if verbose else logging.INFO)
    handlers: list[logging.Handler] = [console]
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        main = logging.FileHandler(Path(log_dir) / "main.log", encoding="utf-8")
        main.setFormatter(logging.Formatter(LOG_FORMAT))
        err = logging.FileHandler(Path(log_dir) / "error.log", encoding="utf-8")
        err.setLevel(logging.ERROR)
        err.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers += [main, err]
    for h in handlers:
        h._moas = True  # type: ignore[attr-defined]
        root.addHandler(h)
    for name, file in (("moas.performance", "performance.log"), ("moas.diagnosis", "diagnosis.log")):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if getattr(h, "_moas", False):
                lg.removeHandler(h)
                h.close()
        lg.propagate = False  # per-step lines would drown main.log and the console
        lg.setLevel(logging.INFO)
        if log_dir is not None:
            fh = logging.FileHandler(Path(log_dir) / file, encoding="utf-8")
            fh.setFormatter(logging.Formatter(LOG_FORMAT))
            fh._moas = True  # type: ignore[attr-defined]
            lg.addHandler(fh)
    for noisy in ("sentence_transformers", "transformers", "diffusers", "urllib3", "huggingface_hub", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
