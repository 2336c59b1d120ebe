"""Inpainting by RePaint-style resampling (Lugmayr et al. 2022) with any trained moas generator.

At every reverse step the unknown region comes from the model (a deterministic DDIM update from its x0
estimate) and the known region from the original image noised to the same level; ``resample`` > 1 jumps
back one step with fresh noise and repeats, which lets the two regions agree across the seam. The caller
composites the final image so the known pixels are bit-for-bit the original's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from moas.diffusion.sampling import initial_noise
from moas.diffusion.schedule import NoiseSchedule


@torch.no_grad()
def repaint(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    known: torch.Tensor,
    mask: torch.Tensor,
    seeds: list[int],
    steps: int,
    resample: int = 3,
    progress: bool = False,
) -> torch.Tensor:
    """Fill ``mask`` = 1 (B, 1, H, W) of ``known`` (B, 3, H, W, in [-1, 1]); returns images in [-1, 1].

    ``model_fn(x_t, t)`` is the (guided) network prediction of the schedule's type (v or ε).
    """
    if steps < 1 or resample < 1:
        raise ValueError("steps and resample must be at least 1")
    device = known.device
    b = known.shape[0]
    T = schedule.num_timesteps
    ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
    abar = (schedule.alpha**2).to(device)  # (T,)
    gen = torch.Generator().manual_seed(int(seeds[0]) + 7919)

    def noise_like() -> torch.Tensor:
        return torch.randn(known.shape, generator=gen).to(device)

    x = initial_noise(seeds, tuple(known.shape[1:]), device)  # (B, 3, H, W)
    for i, t in enumerate(tqdm(ts, desc="inpainting", disable=not progress, leave=False)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else None
        tt = torch.full((b,), t, device=device, dtype=torch.long)
        for r in range(resample):
            x0 = schedule.predict_x0(x, model_fn(x, tt).float(), tt).clamp(-1, 1)  # (B, 3, H, W)
            if t_prev is None:
                x_unknown, x_known = x0, known
            else:
                a_t, a_p = abar[t], abar[t_prev]
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
                x_unknown = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps  # DDIM (η = 0)
                x_known = a_p.sqrt() * known + (1 - a_p).sqrt() * noise_like()
            x_prev = mask * x_unknown + (1 - mask) * x_known
            if t_prev is not None and r + 1 < resample:  # jump back to t with fresh noise and redo the step
                ratio = abar[t] / abar[t_prev]
                x = ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise_like()
            else:
                x = x_prev
    return x.clamp(-1, 1)
