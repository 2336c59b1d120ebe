"""The code maps cannot silently fall behind the code: docs/architecture.md names every module of the
package, and the README's table every top-level module and subpackage; a module added, merged or renamed
without them is a failing test, and so is a name in them that no longer exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moas"


def code_map() -> dict[str, str]:
    """The map's entries: ``"cli.py, cli_args.py"`` or ``"train/"`` → the text of the entry."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text[text.index("```\nmoas/\n") + len("```\nmoas/\n") :]
    block = block[: block.index("```")]
    entries: dict[str, str] = {}
    key = None
    for line in block.splitlines():
        m = re.match(r"  (\S.*?)\s{2,}(.*)$", line)
        if m and not line.startswith("   "):
            key = m.group(1)
            entries[key] = m.group(2)
        elif key is not None:
            entries[key] += " " + line.strip()
    return entries


def test_every_top_level_module_is_in_the_map():
    names = " ".join(f"{k} {v}" for k, v in code_map().items())
    missing = [
        p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__") and p.name not in names
    ]
    assert not missing, f"docs/architecture.md's code map does not name {missing}"


def test_every_module_of_a_package_is_named_in_its_entry():
    entries = code_map()
    missing = []
    for package in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        entry = entries.get(f"{package.name}/")
        assert entry is not None, f"docs/architecture.md's code map has no entry for {package.name}/"
        for module in sorted(package.glob("*.py")):
            if module.stem != "__init__" and not re.search(rf"\b{module.stem}\b", entry):
                missing.append(f"{package.name}/{module.name}")
    assert not missing, f"docs/architecture.md's code map does not name {missing}"


def readme_rows() -> list[str]:
    """The first cells of the README's code-map table: "`moas/cli/`, `demo.py`" → ["cli/", "demo.py"]."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("## Code map") :].split("\n\n")[1]
    names = []
    for line in table.splitlines()[2:]:
        cell = line.split("|")[1]
        names += [n.removeprefix("moas/") for n in re.findall(r"`([^`]+)`", cell)]
    return names


def test_the_readme_table_names_every_top_level_module_and_package_and_nothing_else():
    named = set(readme_rows())
    present = {p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    present |= {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert not present - named, f"README.md's code map does not name {sorted(present - named)}"
    assert not named - present, f"README.md's code map names what does not exist: {sorted(named - present)}"
