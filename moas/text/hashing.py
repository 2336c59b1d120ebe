"""The deterministic SHA-256 hash embedding: the last link of the text-encoder chain (no model at all), and
the cache's hash features.

``_create_hash_embedding`` is the original system's function name.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch

from moas.errors import TextEncoderError

BASE_DIM = 384


def _hash_bits(text: str, n: int) -> torch.Tensor:
    """Return ``n`` values in {-1, +1} taken from SHA-256 digests of ``text`` (UTF-8).

    Digest 0 is ``sha256(text)``; digest i >= 1 is ``sha256(text + "#" + str(i))``. Bits are read
    most-significant first within each byte, byte by byte, digest by digest; bit 1 -> +1, 0 -> -1.
    """
    data = text.encode("utf-8")
    out: list[float] = []
    i = 0
    while len(out) < n:
        digest = hashlib.sha256(data if i == 0 else data + b"#" + str(i).encode("ascii")).digest()
        for byte in digest:
            for k in range(7, -1, -1):
                out.append(1.0 if (byte >> k) & 1 else -1.0)
        i += 1
    return torch.tensor(out[:n], dtype=torch.float32)


def _char_frequency(text: str, n: int) -> torch.Tensor:
    """Character-frequency statistics of ``text`` in ``n`` buckets (see ``_create_hash_embedding``)."""
    counts = [0.0] * n
    for ch in text:
        counts[ord(ch) % n] += 1.0
    freq = torch.tensor(counts, dtype=torch.float32)
    norm = freq.norm()
    if norm > 0:
        # Same per-dimension scale as the +-1 bit part, so neither half drowns the other.
        freq = freq / norm * math.sqrt(n)
    return freq


def _create_hash_embedding(text: str, dim: int = BASE_DIM) -> torch.Tensor:
    """Deterministic SHA-256 embedding of ``text`` (float32 [dim], unit L2 norm unless all zero).

    Identical across runs, processes and machines (no Python ``hash()``).

    Layout, with ``n_bits = (2 * dim) // 3`` (256 for dim 384) and ``n_freq = dim - n_bits``:

    * dims ``[0, n_bits)``: ``_hash_bits(text, n_bits)``, i.e. digest bits mapped to {-1, +1}
      (digest 0 = sha256(text), further digests sha256(text + "#" + i) as needed);
    * dims ``[n_bits, dim)``: character frequencies: bucket ``ord(c) % n_freq`` is incremented for
      every character ``c`` of ``text``, then the bucket vector is scaled to L2 norm
      ``sqrt(n_freq)`` (all zeros for the empty string).

    The concatenation is L2-normalised like the MiniLM sentence embeddings.
    """
    if dim < 1:
        raise TextEncoderError(f"Hash embedding dimension must be positive, got {dim}.")
    n_bits = (2 * dim) // 3
    n_freq = dim - n_bits
    parts = [_hash_bits(text, n_bits)] if n_bits else []
    parts.append(_char_frequency(text, n_freq))
    vec = torch.cat(parts)
    norm = vec.norm()
    return vec / norm if norm > 0 else vec


@functools.lru_cache(maxsize=65536)
def _cached_hash(text: str) -> torch.Tensor:
    # Words and tags repeat constantly; callers only read (torch.stack copies).
    return _create_hash_embedding(text, BASE_DIM)
