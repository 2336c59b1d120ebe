"""Device-free embeddings computed inside DataLoader workers (never a neural network there).

``_create_image_stat_embedding`` is the original's 768-d image representation built from pixel statistics;
``_create_hash_embedding`` (defined with the text encoder in :mod:`moas.text.hashing`) is the deterministic
SHA-256 text fallback. Both are bit-identical across runs and processes: integer histogramming and
float64 NumPy arithmetic in a fixed order, no Python ``hash()``, no RNG.
"""

from __future__ import annotations

import numpy as np
import torch

from moas.text.hashing import _create_hash_embedding

__all__ = ["IMAGE_EMBED_DIM", "STAT_FEATURES", "_create_hash_embedding", "_create_image_stat_embedding"]

IMAGE_EMBED_DIM = 768
HIST_BINS = 50
# 3 channels x (mean, std, min, max) + 3 x 50-bin histograms + 3 cross-channel correlations.
STAT_FEATURES = 3 * 4 + 3 * HIST_BINS + 3


def _create_image_stat_embedding(pixels: torch.Tensor, dim: int = IMAGE_EMBED_DIM) -> torch.Tensor:
    """768-d float32 statistics of a uint8 RGB image ``pixels`` [3, H, W].

    Layout (values of pixels scaled to [0, 1]):

    * ``[0, 12)``: per channel R, G, B: mean, std, min, max;
    * ``[12, 162)``: per channel a 50-bin histogram over [0, 255] (bin = v * 50 // 256), as fractions;
    * ``[162, 165)``: Pearson correlations R-G, R-B, G-B (0 when a channel is constant);
    * fill rule: the 165 statistics are repeated cyclically until ``dim`` values, so every dimension
      carries signal and the vector is always exactly ``dim`` long.
    """
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError("expected a uint8 tensor of shape (3, H, W)")
    arr = pixels.reshape(3, -1).numpy()  # (3, N) uint8
    x = arr.astype(np.float64) / 255.0
    feats: list[float] = []
    for c in range(3):
        feats += [float(x[c].mean()), float(x[c].std()), float(x[c].min()), float(x[c].max())]
    n = max(arr.shape[1], 1)
    for c in range(3):
        bins = (arr[c].astype(np.int64) * HIST_BINS) // 256
        feats += (np.bincount(bins, minlength=HIST_BINS) / n).tolist()
    centred = x - x.mean(axis=1, keepdims=True)
    norms = np.sqrt((centred**2).sum(axis=1))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        denom = norms[a] * norms[b]
        feats.append(float((centred[a] * centred[b]).sum() / denom) if denom > 0 else 0.0)
    base = np.asarray(feats, dtype=np.float64)  # (165,)
    reps = -(-dim // base.size)
    return torch.from_numpy(np.tile(base, reps)[:dim].astype(np.float32))  # (dim,)
