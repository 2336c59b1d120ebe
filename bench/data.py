"""Data-loading throughput: a cached epoch versus decoding every image every epoch, at 512 px.

    python bench/data.py                          # 48 images of 768×640 PNG, 3 interleaved rounds
    python bench/data.py --n 96 --rounds 5 --out bench/data.json

Both paths produce identical items (uint8 pixels at 512×512, the 768-d image-statistics embedding and
the style fingerprint). "decode" uses ``ArtDataset`` without a cache, so every epoch reads, decodes,
crops, resizes and analyses each file; "cached" loads the ``.pt`` entries written by the first pass.
"decode_resize_only" times just read + decode + crop + resize
(no embeddings), the least any uncached loader must do. Epochs alternate (decode, cached, bare, …) so a busy shared machine slows both alike; the
load average is recorded with the numbers. Peak RAM is the process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moas.data.dataset import ArtDataset, center_crop_resize  # noqa: E402
from moas.data.images import load_image  # noqa: E402


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """Illustration-like PNGs: gradient backgrounds, flat-shaded shapes with dark outlines, some noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, h)[:, None, None]
        bg = (top * (1 - t) + bottom * t).repeat(w, 1)  # (h, w, 3)
        img = Image.fromarray(np.clip(bg + rng.normal(0, 4, bg.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
            box = (x0, y0, x0 + int(rng.integers(40, 300)), y0 + int(rng.integers(40, 300)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.ellipse(box, fill=fill, outline=(20, 20, 20), width=3)
        img.save(folder / f"img_{i:04d}.png")
        (folder / f"img_{i:04d}.txt").write_text(f"1girl, tag{i % 7}")


def epoch(ds: ArtDataset) -> float:
    t0 = time.perf_counter()
    for i in range(len(ds)):
        item = ds[i]
        assert item["pixels"].shape == (3, ds.resolution, ds.resolution)
    return len(ds) / (time.perf_counter() - t0)


def decode_only_epoch(ds: ArtDataset) -> float:
    """Read + decode + crop/resize only (no embeddings): the least any uncached loader must do."""
    t0 = time.perf_counter()
    for p in ds.paths:
        center_crop_resize(load_image(p), ds.resolution)
    return len(ds) / (time.perf_counter() - t0)


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1024 / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="number of images")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--height", type=int, default=640)
    ap.add_argument("--resolution", type=int, default=512, help="training size")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved (decode, cached) epoch pairs")
    ap.add_argument("--out", default="bench/data.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_images(data, a.n, (a.width, a.height))
        rss_start = peak_rss_mb()
        cached = ArtDataset(data, a.resolution, Path(tmp) / "cache")
        t0 = time.perf_counter()
        cached.validate(progress=False)  # the first pass: decode + build every entry
        first_pass = a.n / (time.perf_counter() - t0)
        plain = ArtDataset(data, a.resolution, None)
        plain.validate(progress=False)
        decode_ips, cached_ips, bare_ips = [], [], []
        for _ in range(a.rounds):
            decode_ips.append(epoch(plain))
            cached_ips.append(epoch(cached))
            bare_ips.append(decode_only_epoch(plain))
        entry_mb = sum(p.stat().st_size for p in (Path(tmp) / "cache").glob("*.pt")) / a.n / 2**20
    result = {
        "images": a.n,
        "source_size": [a.width, a.height],
        "resolution": a.resolution,
        "first_pass_img_s": round(first_pass, 2),
        "decode_img_s": [round(x, 2) for x in decode_ips],
        "cached_img_s": [round(x, 2) for x in cached_ips],
        "decode_resize_only_img_s": [round(x, 2) for x in bare_ips],
        "speedup_median": round(float(np.median(np.array(cached_ips) / np.array(decode_ips))), 2),
        "speedup_vs_decode_resize_only": round(
            float(np.median(np.array(cached_ips) / np.array(bare_ips))), 2
        ),
        "cache_entry_mb": round(entry_mb, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_mb": round(rss_start, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
