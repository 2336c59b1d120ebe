"""Prompt files: ``moas train --sample_prompts FILE`` (the fixed prompts of the periodic sample grids) and
``moas generate --from_file FILE`` (a batch, one image set per line).

One prompt per line, optionally followed by per-line overrides ``--seed N``, ``--steps N``, ``--scale X``
(guidance scale) and ``--negative TEXT`` (rest of the line); blank lines and lines starting with ``#`` are
skipped. Example::

    1girl, red hair, blue eyes, forest --seed 3
    1girl, silver hair, night city --steps 30 --scale 4.5
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from moas.errors import ConfigError

OPTION = re.compile(r"(?:^|\s)--([A-Za-z_]+)(?:\s+|$)")
MAX_PROMPTS = 64


@dataclass
class SamplePrompt:
    prompt: str
    seed: int | None = None  # None: the prompt's position in the file
    steps: int | None = None  # None: sample.steps
    scale: float | None = None  # None: sample.guidance_scale
    negative: str | None = None  # None: sample.negative_prompt


def parse_sample_prompt_line(line: str, where: str) -> SamplePrompt:
    """One line → SamplePrompt; ``where`` (``FILE:line N``) prefixes every error."""
    matches = list(OPTION.finditer(line))
    prompt = (line[: matches[0].start()] if matches else line).strip()
    if not prompt:
        raise ConfigError(f"{where}: the line has options but no prompt.")
    sp = SamplePrompt(prompt)
    for i, m in enumerate(matches):
        name = m.group(1).lower()
        value = line[m.end() : matches[i + 1].start() if i + 1 < len(matches) else len(line)].strip()
        if not value:
            raise ConfigError(f"{where}: --{name} needs a value.")
        try:
            if name == "seed":
                sp.seed = int(value)
            elif name == "steps":
                sp.steps = int(value)
                if not 1 <= sp.steps <= 1000:
                    raise ValueError
            elif name in ("scale", "guidance_scale", "cfg"):
                sp.scale = float(value)
                if sp.scale < 0:
                    raise ValueError
            elif name in ("negative", "negative_prompt"):
                sp.negative = value
            else:
                raise ConfigError(
                    f"{where}: unknown option --{name} (use --seed, --steps, --scale or --negative)."
                )
        except ValueError:
            raise ConfigError(f"{where}: --{name} has an invalid value {value!r}.") from None
    return sp


def read_sample_prompts(
    path: str | Path, max_prompts: int = MAX_PROMPTS, what: str = "Sample prompts file"
) -> list[SamplePrompt]:
    """Parse a prompts file (see the module doc); a bad line is a ConfigError naming its number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} could not be read ({e}).") from None
    prompts = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            prompts.append(parse_sample_prompt_line(line, f"{path}, line {n}"))
    if not prompts:
        raise ConfigError(f"{what} {path} has no prompts (one prompt per line).")
    if len(prompts) > max_prompts:
        raise ConfigError(f"{what} {path} has {len(prompts)} prompts; at most {max_prompts}.")
    return prompts
