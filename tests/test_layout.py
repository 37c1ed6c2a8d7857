"""The tree shows the architecture: a layer imports only layers below it, and no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "doqproxy"

# Lower number = lower layer. Same-rank imports are allowed (siblings), upward ones are not.
RANKS = {
    "net": 0,
    "dns": 1,
    "doq": 2,
    "cache": 3,
    "upstream": 3,
    "routing": 4,
    "coalesce": 4,
    "deadlines": 4,
    "resolver": 5,
    "frontend": 6,
    "ops": 6,
    "devcerts": 6,
    "settings": 6,
    "forwarder": 7,
    "top": 8,
    "cli": 9,
    "__main__": 10,
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "doqproxy":
                found.update(f"doqproxy.{alias.name}" for alias in node.names)
            elif node.module.startswith("doqproxy."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("doqproxy."))
    return found


def test_no_relative_imports_escape_and_every_layer_is_ranked() -> None:
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        layer = _layer(module)
        if layer == "__init__":
            continue
        assert layer in RANKS, f"{module}: layer {layer!r} has no rank in tests/test_layout.py"


def test_layers_import_only_downwards() -> None:
    bad = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        own = _layer(module)
        if own == "__init__":
            continue
        for target in _imports(path):
            other = _layer(target)
            if other in RANKS and RANKS[other] > RANKS[own]:
                bad.append(f"{module} imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_files_stay_small() -> None:
    big = [
        f"{path.relative_to(PACKAGE.parent)}: {n} lines"
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 600
    ]
    assert not big, big
