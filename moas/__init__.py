"""moas — Multiverse Origin Studio: a from-scratch anime/manga text-to-image system."""

__version__ = "0.1.0"
