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
# Modules every layer may build on: they import no other part of the package but config.
FOUNDATION = {"config"}
# Shared by training and inference; they must not reach up into either, or into the commands.
SHARED = {"sharding", "state", "workdir", "experiment", "evaluation"}
COMMANDS = {"aot", "evaluate", "translate", "average", "cli", "cpu_malloc"}
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
        for target in sorted(targets):
            t = _unit(target)
            if t == unit:
                continue
            rule = None
            if unit in ("model", "data") and t not in FOUNDATION:
                rule = f"{unit} builds on config only"
            elif unit in FOUNDATION and t != "__init__":
                rule = "config imports nothing of the package"
            elif unit in SHARED and t in {"training", "inference", *COMMANDS}:
                rule = "shared modules do not reach into training, inference or commands"
            elif unit == "inference" and t == "training":
                rule = "inference never imports training"
            elif unit == "training" and t == "inference" and target not in (
                INFERENCE_API_FOR_TRAINING
            ):
                rule = f"training uses only {sorted(INFERENCE_API_FOR_TRAINING)} of inference"
            elif unit not in COMMANDS and t in COMMANDS - {"cpu_malloc"}:
                rule = "library code does not import the commands"
            if rule:
                found.append(f"{module} -> {target}: {rule}")
    return found


def test_every_unit_keeps_to_its_layer() -> None:
    edges = import_graph()
    assert "transformer_jax.training.loop" in edges and edges["transformer_jax.training.loop"]
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
            "inference never imports training",
        ),
        ({"transformer_jax.model.layers": {"transformer_jax.sharding"}}, "config only"),
        ({"transformer_jax.workdir": {"transformer_jax.training.loop"}}, "shared modules"),
        ({"transformer_jax.evaluation": {"transformer_jax.translate"}}, "shared modules"),
    ],
)
def test_the_checks_catch_a_bad_import(extra: dict[str, set[str]], expected: str) -> None:
    edges = import_graph()
    for module, targets in extra.items():
        edges[module] = edges[module] | targets
    assert any(expected in v for v in violations(edges)), violations(edges)
    if "inference never imports training" in expected:
        assert ["inference", "training"] in unit_cycles(edges)
