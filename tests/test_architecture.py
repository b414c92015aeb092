"""The import layers of ARCHITECTURE.md, read from the code: every import (those inside functions
included) goes to a lower layer or stays in its own subpackage, and no private name crosses modules.

    .venv/bin/python -m pytest -q tests/test_architecture.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tifaforge"

# Bottom to top; a unit (a subpackage or a top-level module) imports only units of lower layers.
LAYERS = [
    {"tifaforge", "errors"},
    {"fields", "utils", "extras"},
    {"config"},
    {"chat"},
    {"models", "rewards"},
    {"data", "export"},
    {"engine"},
    {"rl", "train"},
    {"eval"},
    {"stages"},
    {"pipeline", "ablate", "serve", "doctor"},
    {"demo", "cli"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tifaforge"


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (SRC / rel).is_dir() or (SRC / rel).with_suffix(".py").exists() or any(SRC.glob(f"{rel}.*.so")) \
        or (SRC / rel).with_suffix(".c").exists()


def imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) for every tifaforge import in the file, at any depth."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "tifaforge"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "tifaforge":
                continue
            for a in node.names:
                sub = f"{module}.{a.name}"
                found.append((node.lineno, sub, None) if is_module(sub) else (node.lineno, module, a.name))
    return found


def graph() -> list[tuple[str, int, str, str | None]]:
    return [(module_name(p), line, mod, name) for p in sorted(SRC.rglob("*.py")) for line, mod, name in imports(p)]


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in SRC.rglob("*.py")}
    assert units <= set(RANK), f"add to LAYERS (and ARCHITECTURE.md): {sorted(units - set(RANK))}"


def test_imports_go_down_the_layers():
    bad = []
    for here, line, module, _ in graph():
        a, b = unit_of(here), unit_of(module)
        if a != b and RANK.get(b, 99) >= RANK.get(a, -1):
            bad.append(f"{here}:{line} imports {module} ({a}, layer {RANK.get(a)} -> {b}, layer {RANK.get(b)})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_private_name_crosses_modules():
    bad = [f"{here}:{line} takes {name} from {module}" for here, line, module, name in graph()
           if name and name.startswith("_") and not name.startswith("__") and module != here]
    assert not bad, "private names used outside their module (make them public):\n" + "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from tifaforge.stages.mgrpo import run_stage\n", "upward"),   # models -> stages
    ("def f():\n    from tifaforge.engine import generate\n", "upward"),  # inside a function
    ("from tifaforge.rewards.rules import _nth\n", "private"),
])
def test_the_checks_catch_a_violation(tmp_path, monkeypatch, source, expected):
    """The checks are not vacuous: a planted upward import (at top level or in a function) or a
    private name fails them."""
    probe = SRC / "models" / "_architecture_probe.py"
    probe.write_text(source, encoding="utf-8")
    try:
        check = test_imports_go_down_the_layers if expected == "upward" else test_no_private_name_crosses_modules
        with pytest.raises(AssertionError, match="_architecture_probe"):
            check()
    finally:
        probe.unlink()
