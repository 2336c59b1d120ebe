"""Images a user hands to generation: the init image of image-to-image, the image and mask of an edit.

Decoded by the training data's safe loader (format from the magic bytes, no decompression bombs), so a
bad file is one sentence, not a traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moas.data.dataset import center_crop_resize
from moas.data.images import load_image
from moas.errors import DataError, ImageDecodeError


def read_array(path: str | Path, what: str, mode: str = "RGB") -> np.ndarray:
    """The file as a uint8 array in PIL ``mode`` (H, W[, C]); ``what`` names it in the error."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"The {what} {p} does not exist.")
    try:
        img = load_image(p)
    except ImageDecodeError as e:
        raise DataError(f"The {what} {p} cannot be read: {e}") from None
    return np.asarray(img.convert(mode), dtype=np.uint8).copy()


def init_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """The init image of image-to-image as uint8 (3, height, width): centre-cropped to the aspect ratio and
    resized (Lanczos) — the same framing the training cache gives its images. An image already at that size
    is returned pixel for pixel."""
    from PIL import Image

    rgb = Image.fromarray(read_array(path, "init image"))
    if rgb.size != (width, height):
        rgb = center_crop_resize(rgb, (width, height))
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
