"""The ``moas`` command: ``main`` (the entry point), the commands by what they work on (``train``,
``generate``, ``data``; the small ones in ``main``), and their flags (``args``, ``generate_args``; no torch
import, so ``moas --help`` is instant). User errors end in one sentence on stderr and a non-zero exit; bugs
keep their traceback.
"""

from moas.cli.main import main

__all__ = ["main"]
