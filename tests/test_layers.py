"""The package's layers hold: no module imports from a layer above its own, at module level or
inside a function, and no two packages import each other.

Layers, lowest first (DESIGN.md): the foundation (``advx._*``, ``errors``) -> ``threat`` ->
``models``, ``data`` -> ``zoo`` -> ``attacks``, ``defenses`` -> ``audit``, ``training`` ->
``guard`` -> ``cli``. ``advx/__init__.py`` is the curated public API and may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "advx"

LAYERS: dict[str, int] = {
    "errors": 0,
    "_version": 0,
    "threat": 1,
    "models": 2,
    "data": 2,
    "viz": 2,
    "zoo": 3,
    "attacks": 4,
    "defenses": 4,
    "audit": 5,
    "training": 5,
    "guard": 6,
    "cli": 7,
    "__main__": 7,
}


def _unit(module: str) -> str:
    """The package (or top-level module) a dotted name ``advx.x.y`` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "advx"


def _layer(unit: str) -> int:
    if unit.startswith("_") and unit not in LAYERS:
        return 0  # the foundation: _io, _validate, _rng, _state, _distributed, ...
    if unit not in LAYERS:
        raise AssertionError(f"advx.{unit} has no layer: add it to LAYERS in {__file__}")
    return LAYERS[unit]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every advx module ``path`` imports (absolute names), with the line: module level and
    inside functions alike; ``if TYPE_CHECKING:`` blocks included (they are cycles too)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "advx"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "advx":
                continue
            # "from . import x" / "from .. import attacks": the names may be submodules
            if node.module is None or target in ("advx",):
                found += [(f"{target}.{a.name}", node.lineno) for a in node.names]
            else:
                found.append((target, node.lineno))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


def test_every_module_imports_only_from_its_layer_or_below():
    wrong = []
    for path in _modules():
        me = _unit(_module_name(path))
        for target, line in _imports(path):
            other = _unit(target)
            if other == "advx":
                wrong.append(f"{path.relative_to(SRC.parent)}:{line} imports the top-level advx")
            elif other != me and _layer(other) > _layer(me):
                wrong.append(
                    f"{path.relative_to(SRC.parent)}:{line} ({me}, layer {_layer(me)}) imports "
                    f"{target} (layer {_layer(other)})"
                )
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_two_packages_import_each_other():
    edges: dict[tuple[str, str], str] = {}
    for path in _modules():
        me = _unit(_module_name(path))
        for target, line in _imports(path):
            other = _unit(target)
            if other not in (me, "advx"):
                edges.setdefault((me, other), f"{path.relative_to(SRC.parent)}:{line}")
    # a cycle of any length between packages (depth-first search for a back edge)
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        for nxt in graph.get(node, []):
            if nxt in stack:
                loop = stack[stack.index(nxt) :] + [nxt]
                where = [edges[(loop[i], loop[i + 1])] for i in range(len(loop) - 1)]
                cycles.append(" -> ".join(loop) + "  (" + "; ".join(where) + ")")
            elif len(stack) < 20:
                visit(nxt, stack + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, "import cycles between packages:\n" + "\n".join(sorted(set(cycles)))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ..audit import x\n", "advx.audit"),
        ("def f():\n    from advx.cli import main\n", "advx.cli"),
        ("from .. import training\n", "advx.training"),
    ],
)
def test_the_parser_sees_relative_absolute_and_function_level_imports(tmp_path, source, expected):
    fake = SRC / "models" / "_probe_for_test.py"
    # parse a file that pretends to live in advx/models, without writing into the package
    tree_path = tmp_path / "advx" / "models" / "_probe.py"
    tree_path.parent.mkdir(parents=True)
    tree_path.write_text(source)
    names = [t for t, _ in _imports_as(tree_path, "advx.models._probe")]
    assert expected in names, (fake, names)


def _imports_as(path: Path, module: str) -> list[tuple[str, int]]:
    global SRC
    saved = SRC
    SRC = path.parents[1]
    try:
        return _imports(path)
    finally:
        SRC = saved
