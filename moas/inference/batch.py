"""``moas generate --from_file FILE``: many prompts with one loaded model.

Each line of the file is a prompt with optional ``--seed``, ``--steps``, ``--scale`` and ``--negative``
(the sample-prompts syntax, ``moas.inference.prompt_file``). A line's option wins over the command's flag,
which wins over the model's own default. Without ``--seed`` a line gets the command's ``--seed`` plus its
position, so every line differs and a rerun repeats. Line k is written as ``<stem>_<k>.png`` (numbered
further with ``--num_images``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moas.errors import MoasError
from moas.inference.generate import GenerateRequest, generate, output_paths, validate_request
from moas.inference.pipeline import Pipeline
from moas.inference.prompt_file import read_sample_prompts

MAX_LINES = 10_000


@dataclasses.dataclass
class BatchLine:
    request: GenerateRequest
    steps_set: bool  # the line or the command chose the steps (else the model's default)
    scale_set: bool


def read_batch(path: str | Path, base: GenerateRequest, steps_set: bool, scale_set: bool) -> list[BatchLine]:
    """One request per line of ``path``, each validated (so a bad line fails before the model loads)."""
    lines = []
    for k, sp in enumerate(read_sample_prompts(path, MAX_LINES, "Prompts file")):
        req = dataclasses.replace(
            base,
            prompt=sp.prompt,
            seed=base.seed + k if sp.seed is None else sp.seed,
            negative_prompt=base.negative_prompt if sp.negative is None else sp.negative,
        )
        if sp.steps is not None:
            req.steps = sp.steps
        if sp.scale is not None:
            req.guidance_scale = sp.scale
        try:
            validate_request(req)
        except MoasError as e:
            raise MoasError(f"{path}, prompt {k + 1} ({sp.prompt!r}): {e}") from None
        lines.append(BatchLine(req, steps_set or sp.steps is not None, scale_set or sp.scale is not None))
    return lines


def generate_batch(
    pipe: Pipeline,
    lines: list[BatchLine],
    output: str | Path,
    model_name: str,
    sampler: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Generate every line with the loaded ``pipe``; returns the written files in line order."""
    stems = output_paths(output, max(2, len(lines)))  # always numbered: one file name per line
    written: list[Path] = []
    for line, stem in zip(lines, stems, strict=False):
        req = line.request
        req.steps, req.guidance_scale, req.sampler = pipe.settings(
            req.steps if line.steps_set else None,
            req.guidance_scale if line.scale_set else None,
            sampler,
        )
        written += generate(pipe, req, stem, model_name, progress=progress)
    return written
