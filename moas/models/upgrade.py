"""Constructor arguments of models saved by earlier releases, spelled as this release expects them.

Model files and checkpoints store the generator's constructor arguments (``model_args``). Features were
added to the brain over time; a file saved before one of them has no key for it, and its weights only fit
a generator built without that feature. This is the one place that knows those keys.
"""

from __future__ import annotations

from typing import Any

# Brain features in the order they were added; a file saved before one has no key for it.
LATER_BRAIN_FEATURES = (
    "panel_memory",
    "memory_pooled",
    "memory_context",
    "tag_routing",
    "aux_targets",
    "expert_tokens",
)
# The value that switches each feature off, where it is not False.
FEATURE_OFF: dict[str, Any] = {"aux_targets": 0.0}
# Later brain settings that are no feature of their own: a file without them gets today's default (which
# its weights do not depend on), so its arguments compare equal to a run's (``moas train --init_from``).
LATER_BRAIN_SETTINGS: dict[str, Any] = {"tag_prior": 2.0}


def features_missing(model_args: dict[str, Any]) -> tuple[str, ...]:
    """The later brain features a saved argument set predates (none for text-only models)."""
    brain = model_args.get("brain")
    if brain is None:
        return ()
    return tuple(k for k in LATER_BRAIN_FEATURES if k not in brain)


def switched_off(model_args: dict[str, Any]) -> dict[str, Any]:
    """The later brain features ``model_args`` predates, each with the value that switches it off."""
    return {k: FEATURE_OFF.get(k, False) for k in features_missing(model_args)}


def upgrade_model_args(model_args: dict[str, Any]) -> dict[str, Any]:
    """``model_args`` of any release → arguments for this release's ``MoasGenerator`` (same weights).

    A file saved before the brain existed has no ``brain`` and stays text-only; a brain saved before a
    later feature gets that feature switched off; a U-Net saved before the per-level head rule keeps its
    old head count (``legacy_head_count``).
    """
    out = dict(model_args)
    if "model" in out and "legacy_head_count" not in out["model"]:
        # Saved before heads = channels // attention_head_dim: keep the head split it was trained with.
        out["model"] = {**out["model"], "legacy_head_count": True}
    off = switched_off(model_args)
    if off:
        settings = {k: v for k, v in LATER_BRAIN_SETTINGS.items() if k not in model_args["brain"]}
        out["brain"] = {**model_args["brain"], **off, **settings}
    return out
