"""Style fingerprints and the artist style database.

:class:`StyleAnalyzer` turns an image into a fixed-length fingerprint of colour, edge/line and Gram
statistics (no neural network, so it runs in DataLoader workers). Fingerprints are grouped by a style key —
the image's top-level folder under the data root (repeat prefixes such as ``10_`` removed) or, for files
directly in the root, the file-name prefix before the first ``_`` — into an :class:`ArtistStyleDatabase`
(mean fingerprint per key), saved as JSON next to the run and inside the model file, so
``moas generate --style NAME`` works from the model file alone.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from moas.errors import MoasError
from moas.io import atomic_write_bytes

COLOR_FEATURES = 24
EDGE_FEATURES = 20
GRAM_FEATURES = 21
STYLE_DIM = COLOR_FEATURES + EDGE_FEATURES + GRAM_FEATURES  # 65
ANALYSIS_SIDE = 128  # images are box-downsampled by an integer factor to at most about this side
_REPEAT_PREFIX = re.compile(r"^\d+_")


def style_key(path: Path, root: Path) -> str | None:
    """``root/alice/x.png`` → ``alice``; ``root/3_alice/x.png`` → ``alice``; ``root/bob_01.png`` → ``bob``."""
    rel = path.relative_to(root)
    if len(rel.parts) > 1:
        return _REPEAT_PREFIX.sub("", rel.parts[0]) or rel.parts[0]
    stem = rel.stem
    return stem.split("_", 1)[0] if "_" in stem and stem.split("_", 1)[0] else None


def _grad(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel gradients of a float image [H, W] with edge padding."""
    p = np.pad(g, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx / 8.0, gy / 8.0


def _laplacian(g: np.ndarray) -> np.ndarray:
    p = np.pad(g, 1, mode="edge")
    return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * g


def _gram(maps: list[np.ndarray]) -> list[float]:
    f = np.stack([m.ravel() - m.mean() for m in maps])  # (K, N)
    f = f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-8)
    gram = f @ f.T  # (K, K), cosine similarities of centred feature maps
    return gram[np.triu_indices(len(maps))].tolist()


class StyleAnalyzer:
    """Image → ``STYLE_DIM`` float32 fingerprint (pure NumPy, deterministic)."""

    dim = STYLE_DIM

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels``: uint8 [3, H, W] → float32 [STYLE_DIM]."""
        rgb = pixels.numpy().astype(np.float64) / 255.0  # (3, H, W)
        factor = -(-max(rgb.shape[1:]) // ANALYSIS_SIDE)
        if factor > 1:  # analyse at most ~128 px: style statistics, not detail; 10-20x cheaper at 512 px
            h, w = rgb.shape[1] // factor * factor, rgb.shape[2] // factor * factor
            rgb = rgb[:, :h, :w].reshape(3, h // factor, factor, w // factor, factor).mean((2, 4))
        r, g, b = rgb
        luma = 0.299 * r + 0.587 * g + 0.114 * b  # (H, W)
        mx, mn = rgb.max(0), rgb.min(0)
        sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-8), 0.0)
        feats = self._colour(rgb, r, g, b, luma, mx, mn, sat)
        feats += self._edges(luma)
        feats += self._gram(rgb, luma, sat)
        out = np.asarray(feats, dtype=np.float64)
        assert out.size == STYLE_DIM
        return torch.from_numpy(np.nan_to_num(out).astype(np.float32))

    @staticmethod
    def _colour(rgb, r, g, b, luma, mx, mn, sat) -> list[float]:
        out = [float(c.mean()) for c in rgb] + [float(c.std()) for c in rgb]
        out += [float(sat.mean()), float(sat.std()), float(mx.mean()), float(mx.std())]
        # Hue histogram (8 bins) weighted by saturation: which colours dominate, ignoring greys.
        delta = np.maximum(mx - mn, 1e-8)
        hue = np.where(
            mx == r, ((g - b) / delta) % 6, np.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4)
        )
        bins = np.clip((hue / 6 * 8).astype(np.int64), 0, 7)
        hist = np.bincount(bins.ravel(), weights=sat.ravel(), minlength=8)
        out += (hist / max(sat.sum(), 1e-8)).tolist()
        rg, yb = r - g, 0.5 * (r + g) - b  # Hasler–Süsstrunk colourfulness
        out.append(float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())))
        q = (rgb * 15).round().astype(np.int64)
        out.append(len(np.unique(q[0] * 256 + q[1] * 16 + q[2])) / 4096)  # palette size, 4-bit colours
        out += [float((luma > 0.92).mean()), float((luma < 0.08).mean())]
        out += [float(np.percentile(luma, 5)), float(np.percentile(luma, 95))]
        return out

    @staticmethod
    def _edges(luma) -> list[float]:
        gx, gy = _grad(luma)
        mag = np.hypot(gx, gy)
        out = [float(mag.mean()), float(mag.std())]
        out += [float((mag > t).mean()) for t in (0.05, 0.15, 0.3)]
        ang = np.arctan2(gy, gx) % math.pi  # line orientation, 8 bins over [0, π)
        bins = np.clip((ang / math.pi * 8).astype(np.int64), 0, 7)
        hist = np.bincount(bins.ravel(), weights=mag.ravel(), minlength=8)
        out += (hist / max(mag.sum(), 1e-8)).tolist()
        out.append(float(math.log1p(_laplacian(luma).var() * 1e3)))
        edge = mag > 0.15
        out += [float(luma[edge].mean()) if edge.any() else 0.0, float(luma.mean())]  # line darkness
        h, w = luma.shape
        half = luma[: h - h % 2, : w - w % 2]
        half = half.reshape(h // 2, 2, w // 2, 2).mean((1, 3)) if h >= 2 and w >= 2 else luma
        m2 = np.hypot(*_grad(half))
        out += [float(m2.mean()), float(m2.std())]
        out += [float((mag < 0.02).mean()), float(luma.std())]  # flat-fill fraction, contrast
        return out

    @staticmethod
    def _gram(rgb, luma, sat) -> list[float]:
        gx, gy = _grad(luma)
        out = _gram([luma, sat, np.abs(gx), np.abs(gy), np.abs(_laplacian(luma))])  # 15
        return out + _gram([rgb[0], rgb[1], rgb[2]])  # 6


class ArtistStyleDatabase:
    """Style key → mean fingerprint (and image count); JSON on disk."""

    VERSION = 1

    def __init__(self, dim: int = STYLE_DIM) -> None:
        self.dim = dim
        self._sum: dict[str, np.ndarray] = {}
        self._count: dict[str, int] = {}

    def add(self, key: str, fingerprint: torch.Tensor) -> None:
        v = fingerprint.double().numpy()
        if v.shape != (self.dim,):
            raise ValueError(f"fingerprint must have {self.dim} values")
        self._sum[key] = self._sum.get(key, 0.0) + v
        self._count[key] = self._count.get(key, 0) + 1

    def names(self) -> list[str]:
        return sorted(self._sum)

    def __len__(self) -> int:
        return len(self._sum)

    def __contains__(self, key: str) -> bool:
        return key in self._sum

    def get(self, key: str) -> torch.Tensor:
        """The mean fingerprint of ``key``; unknown names raise MoasError listing the known ones."""
        if key not in self._sum:
            known = ", ".join(self.names()) or "none (train with data.extract_style = true)"
            raise MoasError(f"Unknown style '{key}'; known styles: {known}.")
        return torch.from_numpy((self._sum[key] / self._count[key]).astype(np.float32))

    def to_dict(self) -> dict:
        return {
            "version": self.VERSION,
            "dim": self.dim,
            "styles": {
                k: {"count": self._count[k], "fingerprint": (self._sum[k] / self._count[k]).tolist()}
                for k in self.names()
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> ArtistStyleDatabase:
        try:
            db = cls(int(d["dim"]))
            for k, v in d["styles"].items():
                n = int(v["count"])
                fp = np.asarray(v["fingerprint"], dtype=np.float64)
                if fp.shape != (db.dim,) or n < 1:
                    raise ValueError(k)
                db._sum[str(k)], db._count[str(k)] = fp * n, n
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MoasError(f"The style database is malformed ({e!r}).") from None
        return db

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(p, json.dumps(self.to_dict(), indent=1).encode())
        return p

    @classmethod
    def load(cls, path: str | Path) -> ArtistStyleDatabase:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise MoasError(f"Style database {path} does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MoasError(f"Style database {path} is not valid JSON.") from None
