"""Samplers (diffusers schedulers) with classifier-free guidance and per-image seeds.

Every sampler is built from the training scheduler's config, so the noise schedule and prediction type
always match the trained network. Each image has its own ``torch.Generator`` for the initial noise and
for ancestral noise, so an image depends on its seed only — not on the batch it was drawn in.
"""

from __future__ import annotations

from collections.abc import Callable

import diffusers
import torch
from tqdm.auto import tqdm

from moas.device import host_work
from moas.diffusion.registry import SAMPLERS

STOCHASTIC = {spec.scheduler for spec in SAMPLERS.values() if spec.stochastic}


def make_sampler(name: str, train_config: dict):
    """The registry's sampler ``name``, built from the training scheduler's config (host work: its tables
    live on the CPU)."""
    try:
        spec = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}") from None
    with host_work():
        return getattr(diffusers, spec.scheduler).from_config(train_config, **spec.options)


def initial_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One standard-normal image per seed, drawn on the CPU so the same seed gives the same image anywhere."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    ).to(device)


def start_from(
    scheduler, init: torch.Tensor, noise: torch.Tensor, strength: float
) -> tuple[torch.Tensor, int]:
    """Image-to-image (SDEdit): ``init`` noised to the level ``strength`` of the schedule, and the index of
    the first timestep left to run. The number of steps run is ``round(strength · steps)``; 0 keeps ``init``."""
    timesteps = scheduler.timesteps
    run = min(len(timesteps), round(strength * len(timesteps)))
    if run == 0:
        return init, len(timesteps)
    begin = len(timesteps) - run
    if hasattr(scheduler, "set_begin_index"):  # sigma schedulers index their tables from the first step
        scheduler.set_begin_index(begin)
    t0 = timesteps[begin : begin + 1].expand(init.shape[0])
    return scheduler.add_noise(init, noise, t0), begin


def schedule(scheduler, steps: int) -> list[int]:
    """Set ``scheduler`` for ``steps`` steps from pure noise; its timesteps as Python ints.

    Host work: diffusers computes the tables in numpy, and the timesteps stay on the CPU, so the loop reads
    each as a number without waiting for the GPU. The schedulers that count their own steps start at the
    first (the same index they would look up for the first timestep, without the lookup)."""
    with host_work():
        scheduler.set_timesteps(steps)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return [int(t) for t in scheduler.timesteps.tolist()]


@torch.no_grad()
def sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    seeds: list[int],
    shape: tuple[int, int, int],
    steps: int,
    guidance_scale: float,
    device: torch.device,
    progress: bool = False,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Run the reverse process and return images in [-1, 1], shape (B, C, H, W).

    ``model_fn(x, t)`` returns the guided prediction for the whole batch (see ``guided``). The ancestral
    noise of stochastic samplers is drawn from per-image generators. ``init`` (B, C, H, W) in [-1, 1] with
    ``strength`` < 1 starts from that image instead of pure noise (``start_from``); strength 1 ignores it,
    so it equals text-to-image with the same seeds.
    """
    ints = schedule(scheduler, steps)
    noise = initial_noise(seeds, shape, device)
    if init is None or strength >= 1.0:
        x, first = noise * scheduler.init_noise_sigma, 0
    else:
        x, first = start_from(scheduler, init.to(device=device, dtype=noise.dtype), noise, strength)
    # CPU generators: diffusers draws one noise tensor per generator, so each image keeps its own stream.
    step_kwargs = {}
    if type(scheduler).__name__ in STOCHASTIC:
        step_kwargs["generator"] = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]
    for i in tqdm(range(first, len(ints)), desc="sampling", disable=not progress, leave=False):
        t = scheduler.timesteps[i]  # on the CPU: the schedulers step with it as a tensor
        x_in = scheduler.scale_model_input(x, t)
        tt = torch.full((x.shape[0],), ints[i], device=device, dtype=torch.long)
        pred = model_fn(x_in, tt)
        x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
    return x.clamp(-1, 1)


def guided(
    denoise: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor],
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    guidance_scale: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Classifier-free guidance: pred = u + s·(c − u), with u from the negative/null prompt.

    ``cond``/``uncond`` are text-encoding dicts padded to the same length; conditional and unconditional
    passes run as one batch of 2B.
    """
    if guidance_scale == 1.0:
        return lambda x, t: denoise(x, t, cond)
    both = {k: torch.cat([uncond[k], cond[k]], 0) for k in cond}

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u, c = denoise(torch.cat([x, x], 0), torch.cat([t, t], 0), both).chunk(2)
        return u + guidance_scale * (c - u)

    return fn
