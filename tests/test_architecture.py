"""The package's layering (docs/architecture.md), read from the import statements themselves.

Every `import` in transformer_jax, also those inside functions, is an edge between units: the
first name under transformer_jax (`model`, `data`, `training`, `inference`, `sharding`, ...).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "transformer_jax"
SHARED = {"sharding", "state", "workdir", "experiment", "evaluation"}
LIBRARY = {"config", "model", "data", *SHARED, "inference", "training", "interop"}
COMMANDS = {"aot", "evaluate", "translate", "average", "export", "convert"}
# What each unit may import (docs/architecture.md, "may import"); a unit always may import
# itself. Commands may import any library unit and the shared flags in `cli`.
ALLOWED: dict[str, set[str]] = {
    "__init__": {"config", "inference"},  # load/Translator, imported lazily
    "config": set(),
    "model": {"config"},
    "data": {"config"},
    "sharding": set(),
    "state": {"config", "model", "sharding"},
    "workdir": {"config", "data"},
    "experiment": {"config", "data", "sharding"},
    "evaluation": {"config", "data", "sharding"},
    "inference": {
        "config",
        "model",
        "data",
        "sharding",
        "state",
        "workdir",
        "evaluation",
        "interop",
    },
    # Other tools' model formats: built from our config, parameters and tokenizer.
    "interop": {"config", "model", "data"},
    "training": {"config", "model", "data", *SHARED, "inference"},
    "cli": {"inference"},
    "cpu_malloc": set(),
    "distributed": set(),
    **{command: LIBRARY | {"cli"} for command in COMMANDS},
}
# What training may use of inference: its public decoding engine, nothing else.
INFERENCE_API_FOR_TRAINING = {"transformer_jax.inference.engine"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, known: Iterable[str]) -> set[str]:
    """Package modules imported by one file (submodules named in `from X import Y` resolved)."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("transformer_jax"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if not base.startswith("transformer_jax"):
                continue
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
    return found


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def unit_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between units (strongly connected components with more than one unit)."""
    graph: dict[str, set[str]] = {}
    for module, targets in edges.items():
        graph.setdefault(_unit(module), set()).update(
            _unit(t) for t in targets if _unit(t) != _unit(module)
        )
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a layering rule, as 'importer -> imported: rule'."""
    found = []
    for module, targets in sorted(edges.items()):
        unit = _unit(module)
        allowed = ALLOWED.get(unit)
        for target in sorted(targets):
            t = _unit(target)
            if t == unit:
                continue
            if allowed is None:
                found.append(f"{module}: unit {unit!r} is not in the layering table")
            elif t not in allowed:
                found.append(f"{module} -> {target}: {unit} may import only {sorted(allowed)}")
            elif (
                unit == "training"
                and t == "inference"
                and target not in (INFERENCE_API_FOR_TRAINING)
            ):
                found.append(
                    f"{module} -> {target}: training uses only "
                    f"{sorted(INFERENCE_API_FOR_TRAINING)} of inference"
                )
    return found


def test_every_unit_keeps_to_its_layer() -> None:
    edges = import_graph()
    assert edges.get("transformer_jax.training.loop")
    assert violations(edges) == []


def test_no_import_cycle_between_units() -> None:
    assert unit_cycles(import_graph()) == []


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # The cycle this layering removed: training -> inference.decode, and the translator
        # reaching into training for checkpoints and sharding.
        (
            {
                "transformer_jax.training.loop": {"transformer_jax.inference.decode"},
                "transformer_jax.inference.translator": {"transformer_jax.training.step"},
            },
            "inference may import only",
        ),
        ({"transformer_jax.training.loop": {"transformer_jax.inference.decode"}}, "uses only"),
        ({"transformer_jax.model.layers": {"transformer_jax.sharding"}}, "model may import"),
        ({"transformer_jax.workdir": {"transformer_jax.training.loop"}}, "workdir may import"),
        ({"transformer_jax.evaluation": {"transformer_jax.translate"}}, "evaluation may import"),
        ({"transformer_jax.sharding": {"transformer_jax.state"}}, "sharding may import"),
        ({"transformer_jax.newunit": {"transformer_jax.config"}}, "not in the layering table"),
    ],
)
def test_the_checks_catch_a_bad_import(extra: dict[str, set[str]], expected: str) -> None:
    edges = import_graph()
    for module, targets in extra.items():
        edges[module] = edges.get(module, set()) | targets
    assert any(expected in v for v in violations(edges)), violations(edges)
    if len(extra) == 2:
        assert ["inference", "training"] in unit_cycles(edges)
