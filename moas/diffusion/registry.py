"""The sampler registry: every sampler's name, its label in PNG parameters and the diffusers scheduler that
implements it. Torch-free, so the command line and the config can list the choices without importing
torch; ``moas.diffusion.sampling`` builds the schedulers from it. Defaults (which sampler, how many steps,
which guidance scale) live in ``moas.config.SampleConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplerSpec:
    label: str  # A1111-style name in the PNG parameters
    scheduler: str  # diffusers class
    options: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False  # draws fresh noise every step (per-image generators keep seeds exact)


SAMPLERS: dict[str, SamplerSpec] = {
    "dpmsolver++": SamplerSpec(
        "DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}
    ),
    "ddim": SamplerSpec("DDIM", "DDIMScheduler"),
    "ddpm": SamplerSpec("DDPM", "DDPMScheduler", stochastic=True),
    "euler_a": SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", stochastic=True),
}
SAMPLER_NAMES = tuple(SAMPLERS)
