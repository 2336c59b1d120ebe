"""Generation speed on the CPU: the conditioning computed once per prompt against the whole generator at
every sampler step.

    python bench/generation.py                       # cpu_tiny and rtx3060_12gb, 3 interleaved rounds
    python bench/generation.py --profiles cpu_tiny --rounds 5

``Pipeline.denoise`` runs the brain (the experts, GNN, DataFlow: everything that depends on the prompt
alone) once per prompt and only the U-Net at each step; the "every step" column is the same pipeline with
``denoise`` calling the whole generator, as it did before. Both give the same images (checked here). The
networks are freshly initialised (speed does not depend on training); the text encoder is the hashing one,
so encoding is not timed. Rounds alternate the two ways, one thread count, so a busy machine slows both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from moas.config import load_config  # noqa: E402
from moas.device import cpu_name  # noqa: E402
from moas.inference.pipeline import Pipeline  # noqa: E402
from moas.text.encoder import HASH_ID, TextEncoder  # noqa: E402
from moas.train.builders import build_generator  # noqa: E402

PROMPTS = ["1girl, long hair, red eyes, forest", "1boy, short hair, city at night"]


class EveryStep(Pipeline):
    """The pipeline as before: the whole generator (brain and U-Net) at every sampler step."""

    def denoise(self, x: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(x, t, text).pred.float()


def pipelines(profile: str) -> tuple[Pipeline, Pipeline]:
    cfg = load_config(profile, None, use_env=False)
    torch.manual_seed(0)
    model = build_generator(cfg, torch.device("cpu"))
    encoder = TextEncoder(require_id=HASH_ID, max_tokens=cfg.text.max_tokens)
    cpu = torch.device("cpu")
    return (
        Pipeline(model, encoder, cfg.diffusion, cpu, sample_defaults=cfg.sample),
        EveryStep(model, encoder, cfg.diffusion, cpu, sample_defaults=cfg.sample),
    )


def timed(pipe: Pipeline, steps: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    images = pipe(PROMPTS, [1, 2], steps=steps)
    return time.perf_counter() - t0, images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", nargs="+", default=["cpu_tiny", "rtx3060_12gb"])
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: 20 tiny, 6 rtx)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("generation.json"))
    a = ap.parse_args()
    results = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "threads": torch.get_num_threads()}
    for profile in a.profiles:
        steps = a.steps or (20 if profile == "cpu_tiny" else 6)
        once, every = pipelines(profile)
        timed(once, 1), timed(every, 1)  # warm-up
        t_once, t_every = [], []
        for _ in range(a.rounds):
            s, img_once = timed(once, steps)
            t_once.append(s)
            s, img_every = timed(every, steps)
            t_every.append(s)
        row = {
            "steps": steps,
            "images": len(PROMPTS),
            "once_s": [round(x, 3) for x in t_once],
            "every_step_s": [round(x, 3) for x in t_every],
            "speedup": round(statistics.median(t_every) / statistics.median(t_once), 2),
            "same_images": bool(torch.equal(img_once, img_every)),
        }
        results[profile] = row
        print(profile, json.dumps(row), flush=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
