"""DataFlow: a thread-safe registry of pipeline stages wired by named inputs and outputs.

Each stage is registered with a name, the input keys it takes and the output keys it produces.
``forward(**inputs)`` resolves the stages into dependency order and runs them, passing values along
the graph, so a new stage is added by registration alone. This mirrors the original system's
``data_flow.register_module(...)`` / ``data_flow.connect('gnn', 'graph_features', 'structure',
'embedding')`` API.

Where an input comes from, in order of precedence:

1. an explicit ``connect(src_module, src_key, dst_module, dst_key)``;
2. an external input of the same name passed to ``forward`` (lets callers feed precomputed values);
3. the output key of the same name of exactly one *other* module (several producers are ambiguous
   and need an explicit ``connect``).

Stages are held in an ``nn.ModuleDict`` so their parameters train and save with the owner.
Plain callables are wrapped in a parameter-free module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from moas.errors import DataFlowError

# A source is ("ext", key) for an external input or ("mod", module, key) for a module output.
Source = tuple[str, ...]
_PLAN_CACHE_MAX = 64


@dataclass(frozen=True)
class _Spec:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class _Step:
    name: str
    sources: tuple[tuple[str, Source], ...]  # (input key, source) pairs
    outputs: tuple[str, ...]


class _CallableModule(nn.Module):
    """Lets a plain function be registered as a stage (it has no parameters)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, **kwargs: Any) -> Any:
        return self.fn(**kwargs)


def _check_names(kind: str, names: Iterable[str], module: str) -> tuple[str, ...]:
    out = tuple(names) if not isinstance(names, str) else (names,)
    for key in out:
        if not isinstance(key, str) or not key.isidentifier():
            raise DataFlowError(
                f"Module '{module}' has an invalid {kind} key {key!r}; keys must be identifiers."
            )
    if len(set(out)) != len(out):
        raise DataFlowError(f"Module '{module}' declares a duplicate {kind} key in {list(out)}.")
    return out


class DataFlow(nn.Module):
    """Registry of stages executed in dependency order (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleDict()
        self._specs: dict[str, _Spec] = {}  # registration order is the tie-break order
        self._connections: dict[tuple[str, str], tuple[str, str]] = {}  # (dst, key) -> (src, key)
        self._plans: dict[tuple[frozenset[str] | None, tuple[str, ...] | None], list[_Step]] = {}
        self._lock = threading.Lock()

    # ---- pickling / deepcopy (locks cannot be copied) -------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_plans"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    # ---- registration -------------------------------------------------------------------------

    def register_module(
        self,
        name: str,
        module: nn.Module | Callable[..., Any],
        inputs: Sequence[str],
        outputs: Sequence[str],
    ) -> None:
        """Add a stage called ``name`` taking ``inputs`` and producing ``outputs``."""
        if not isinstance(name, str) or not name.isidentifier():
            raise DataFlowError(f"Module name {name!r} is invalid; names must be identifiers without dots.")
        if not callable(module):
            raise DataFlowError(f"Module '{name}' is not callable.")
        spec = _Spec(name, _check_names("input", inputs, name), _check_names("output", outputs, name))
        wrapped = module if isinstance(module, nn.Module) else _CallableModule(module)
        with self._lock:
            if name in self._specs:
                raise DataFlowError(f"A module named '{name}' is already registered.")
            if hasattr(self.stages, name):
                # ModuleDict refuses keys that shadow its own attributes (e.g. 'update', 'keys').
                raise DataFlowError(f"Module name '{name}' is reserved; choose another name.")
            self.stages[name] = wrapped
            self._specs[name] = spec
            self._plans.clear()

    def unregister_module(self, name: str) -> None:
        """Remove a stage and every connection to or from it."""
        with self._lock:
            if name not in self._specs:
                raise DataFlowError(f"No module named '{name}' is registered.")
            del self._specs[name]
            del self.stages[name]
            self._connections = {
                dst: src for dst, src in self._connections.items() if dst[0] != name and src[0] != name
            }
            self._plans.clear()

    def connect(self, src_module: str, src_key: str, dst_module: str, dst_key: str) -> None:
        """Feed output ``src_key`` of ``src_module`` to ``dst_module`` as its input ``dst_key``."""
        with self._lock:
            src = self._specs.get(src_module)
            dst = self._specs.get(dst_module)
            if src is None:
                raise DataFlowError(f"Cannot connect from unknown module '{src_module}'.")
            if dst is None:
                raise DataFlowError(f"Cannot connect to unknown module '{dst_module}'.")
            if src_key not in src.outputs:
                raise DataFlowError(
                    f"Module '{src_module}' has no output '{src_key}' (outputs: {list(src.outputs)})."
                )
            if dst_key not in dst.inputs:
                raise DataFlowError(
                    f"Module '{dst_module}' has no input '{dst_key}' (inputs: {list(dst.inputs)})."
                )
            existing = self._connections.get((dst_module, dst_key))
            if existing is not None and existing != (src_module, src_key):
                raise DataFlowError(
                    f"Input '{dst_key}' of module '{dst_module}' is already connected to "
                    f"'{existing[0]}.{existing[1]}'."
                )
            self._connections[(dst_module, dst_key)] = (src_module, src_key)
            self._plans.clear()

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def get_module(self, name: str) -> nn.Module:
        """The registered module called ``name``."""
        with self._lock:
            if name not in self._specs:
                raise DataFlowError(f"No module named '{name}' is registered.")
            return self.stages[name]

    # ---- planning (always called with the lock held) ------------------------------------------

    def _source(self, spec: _Spec, key: str, external: frozenset[str] | None) -> Source | None:
        """Where input ``key`` of ``spec`` comes from; ``external=None`` means "anything unknown is external"."""
        conn = self._connections.get((spec.name, key))
        if conn is not None:
            return ("mod", conn[0], conn[1])
        if external is not None and key in external:
            return ("ext", key)
        producers = [s.name for s in self._specs.values() if s.name != spec.name and key in s.outputs]
        if len(producers) > 1:
            raise DataFlowError(
                f"Input '{key}' of module '{spec.name}' is produced by several modules "
                f"({', '.join(producers)}); connect one explicitly."
            )
        if producers:
            return ("mod", producers[0], key)
        if external is None:
            return ("ext", key)
        return None

    def _producer_of(self, target: str) -> str | None:
        """Module that must run for a required output ``key`` or ``module.key``."""
        if "." in target:
            mod, key = target.split(".", 1)
            if mod not in self._specs or key not in self._specs[mod].outputs:
                raise DataFlowError(f"Required output '{target}' is not produced by any module.")
            return mod
        producers = [s.name for s in self._specs.values() if target in s.outputs]
        if len(producers) > 1:
            raise DataFlowError(
                f"Required output '{target}' is produced by several modules ({', '.join(producers)}); "
                f"name it as 'module.{target}'."
            )
        if not producers:
            raise DataFlowError(f"Required output '{target}' is not produced by any module.")
        return producers[0]

    def _plan(self, external: frozenset[str] | None, required: tuple[str, ...] | None) -> list[_Step]:
        cache_key = (external, required)
        cached = self._plans.get(cache_key)
        if cached is not None:
            return cached

        # Which modules must run: all of them, or the ancestors of the required outputs.
        if required is None:
            needed = list(self._specs)
        else:
            pending = [p for p in (self._producer_of(t) for t in required) if p is not None]
            needed_set: set[str] = set()
            while pending:
                name = pending.pop()
                if name in needed_set:
                    continue
                needed_set.add(name)
                spec = self._specs[name]
                for key in spec.inputs:
                    src = self._source(spec, key, external)
                    if src is not None and src[0] == "mod":
                        pending.append(src[1])
            needed = [n for n in self._specs if n in needed_set]

        steps: dict[str, _Step] = {}
        deps: dict[str, set[str]] = {}
        for name in needed:
            spec = self._specs[name]
            sources = []
            for key in spec.inputs:
                src = self._source(spec, key, external)
                if src is None:
                    raise DataFlowError(
                        f"Module '{name}' needs input '{key}' but no connection, external input "
                        f"or module output provides it."
                    )
                sources.append((key, src))
            steps[name] = _Step(name, tuple(sources), spec.outputs)
            deps[name] = {s[1] for _, s in sources if s[0] == "mod"}

        # Kahn's algorithm; among ready modules the earliest registered runs first (stable order).
        order: list[_Step] = []
        done: set[str] = set()
        remaining = list(needed)
        while remaining:
            ready = next((n for n in remaining if deps[n] <= done), None)
            if ready is None:
                raise DataFlowError(
                    f"DataFlow has a cycle: {' -> '.join(self._find_cycle(remaining, deps))}."
                )
            remaining.remove(ready)
            done.add(ready)
            order.append(steps[ready])

        if len(self._plans) >= _PLAN_CACHE_MAX:
            self._plans.clear()
        self._plans[cache_key] = order
        return order

    @staticmethod
    def _find_cycle(remaining: list[str], deps: dict[str, set[str]]) -> list[str]:
        """Walk unmet dependencies from a stuck module until a module repeats; that loop is a cycle."""
        stuck = set(remaining)
        path: list[str] = []
        node = remaining[0]
        while node not in path:
            path.append(node)
            node = sorted(d for d in deps[node] if d in stuck)[0]
        cycle = path[path.index(node) :]
        # Report in execution (data) direction: producer -> consumer.
        cycle.reverse()
        return [*cycle, cycle[0]]

    # ---- execution ----------------------------------------------------------------------------

    def forward(self, *, required_outputs: Sequence[str] | None = None, **inputs: Any) -> dict[str, Any]:
        """Run the stages; returns the external inputs plus each output as ``key`` and ``module.key``.

        With ``required_outputs`` (keys or ``module.key``), only the stages those outputs depend on
        run. A plain ``key`` produced by several modules holds the last one executed; the
        ``module.key`` entries are always unambiguous.
        """
        required = tuple(required_outputs) if required_outputs is not None else None
        with self._lock:
            plan = self._plan(frozenset(inputs), required)
            modules = {step.name: self.stages[step.name] for step in plan}
        # Executed outside the lock so long-running stages do not block registration elsewhere.
        produced: dict[tuple[str, str], Any] = {}
        result: dict[str, Any] = dict(inputs)
        for step in plan:
            kwargs = {
                key: inputs[src[1]] if src[0] == "ext" else produced[(src[1], src[2])]
                for key, src in step.sources
            }
            value = modules[step.name](**kwargs)
            for key, out in self._unpack(step, value).items():
                produced[(step.name, key)] = out
                result[key] = out
                result[f"{step.name}.{key}"] = out
        return result

    @staticmethod
    def _unpack(step: _Step, value: Any) -> dict[str, Any]:
        if not step.outputs:
            return {}
        if isinstance(value, Mapping) and (len(step.outputs) > 1 or step.outputs[0] in value):
            missing = [k for k in step.outputs if k not in value]
            if missing:
                raise DataFlowError(
                    f"Module '{step.name}' did not return its declared output '{missing[0]}'."
                )
            return {k: value[k] for k in step.outputs}
        if len(step.outputs) == 1:
            return {step.outputs[0]: value}
        raise DataFlowError(
            f"Module '{step.name}' declares outputs {list(step.outputs)} but returned a "
            f"{type(value).__name__} instead of a dict."
        )

    # ---- introspection ------------------------------------------------------------------------

    def modules_in_order(self) -> list[str]:
        """Module names in execution order (inputs nothing produces are assumed external)."""
        with self._lock:
            return [step.name for step in self._plan(None, None)]

    def describe(self) -> str:
        """Readable listing of the stages in execution order, their inputs' sources and outputs."""
        with self._lock:
            try:
                plan = self._plan(None, None)
                problem = None
            except DataFlowError as exc:
                problem = str(exc)
                plan = [
                    _Step(s.name, tuple((k, ("?", k)) for k in s.inputs), s.outputs)
                    for s in self._specs.values()
                ]
            lines = [
                f"DataFlow with {len(plan)} module(s)" + (" in execution order:" if problem is None else ":")
            ]
            if problem is not None:
                lines.append(f"  INVALID: {problem} (listed in registration order)")
            for i, step in enumerate(plan, 1):
                kind = type(self.stages[step.name]).__name__
                lines.append(f"  {i}. {step.name} ({kind})")
                for key, src in step.sources:
                    if src[0] == "mod":
                        how = "connected" if (step.name, key) in self._connections else "by name"
                        origin = f"{src[1]}.{src[2]} ({how})"
                    elif src[0] == "ext":
                        origin = "external input"
                    else:
                        origin = "unresolved"
                    lines.append(f"       in  {key} <- {origin}")
                for key in step.outputs:
                    lines.append(f"       out {key}")
            return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"modules={list(self._specs)}"
