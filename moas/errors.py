"""User-facing errors.

Anything a user can cause (a bad path, a corrupt image, a wrong checkpoint, a bad flag) is raised as a
``MoasError`` subclass whose message is one clear sentence. The CLI prints that sentence and exits
non-zero; every other exception is a bug and keeps its traceback.
"""


class MoasError(Exception):
    """An error caused by user input or environment, reported as one sentence."""

    exit_code = 2


class ConfigError(MoasError):
    """Invalid configuration value, profile or flag combination."""


class DataError(MoasError):
    """Missing, empty or unusable training data."""


class ImageDecodeError(DataError):
    """A single image file could not be read safely (the reason is the message)."""


class CheckpointError(MoasError):
    """A model or checkpoint file is missing, corrupt, or incompatible."""


class TextEncoderError(MoasError):
    """The text encoder recorded in a checkpoint is not available, or text input is invalid."""


class DataFlowError(MoasError):
    """The DataFlow graph is malformed: missing inputs, cycles, duplicate or unknown modules."""

    exit_code = 1
