"""The package's shape, from the source alone: no import circles, layers that only import downward, files
under 500 lines, functions under 80, and the whole config read only by the builders and commands.

Every import counts, also the ones inside functions and under ``TYPE_CHECKING``: a circle hidden in a
function is still a circle for the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moas"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80

# Bottom to top. A module may import its own layer or any below it.
LAYERS = {
    "errors": 0,
    "io": 0,
    "checkpoint": 1,
    "device": 1,
    "resources": 1,
    "safety": 1,
    "config": 2,
    "config_sections": 2,
    "text": 2,
    "data": 2,
    "models": 2,
    "diffusion": 2,
    "losses": 2,
    "eval": 3,
    "inference": 3,
    "monitor": 4,
    "train": 5,
    "studio": 6,
    "doctor": 6,
    "demo": 6,
    "webui": 6,  # the web UI: only moas.cli imports it
    "cli": 7,
    "__main__": 7,
    "__init__": 0,
}
# Builders and commands: the only modules that may take the whole MoasConfig.
CONFIG_READERS = {
    "moas.config",
    "moas.cli.main",
    "moas.cli.train",
    "moas.doctor",
    "moas.train.builders",
    "moas.train.data_setup",
    "moas.train.hpo",
    "moas.train.plans",
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name and m != "moas"}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_moas():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_import_points_down_or_sideways():
    graph = import_graph()
    assert all(m.split(".")[1] in LAYERS for m in graph if m.count(".")), "a module outside LAYERS"
    upward = [f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer(b) > layer(a)]
    assert not upward, upward


def test_only_the_cli_imports_the_web_ui():
    """Gradio is an optional extra: nothing but the ``moas webui`` command may pull it in."""
    importers = {
        a
        for a, deps in import_graph().items()
        if not a.startswith("moas.webui") and any(b.startswith("moas.webui") for b in deps)
    }
    assert importers <= {"moas.cli.main"}, sorted(importers)


def test_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{name} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name} ({n} lines)")
    assert not long_files and not long_functions, (long_files, long_functions)


def test_only_builders_and_commands_read_the_whole_config():
    readers = {
        name
        for name, path in modules().items()
        if any(
            isinstance(n, ast.ImportFrom)
            and n.module == "moas.config"
            and any(a.name == "MoasConfig" for a in n.names)
            for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        )
    }
    assert readers <= CONFIG_READERS, sorted(readers - CONFIG_READERS)
