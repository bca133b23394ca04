"""The package's import graph, read from the source with ``ast``: no cycle, no upward import.

**What counts as an edge.** Every ``import`` and ``from ... import`` statement anywhere in a
module (top level, inside functions, under ``if TYPE_CHECKING:``, relative or absolute), and
``importlib.import_module("literal")``. Type-only imports count: a type-level cycle is still a
cycle for a reader and a type checker, and the fix (a protocol moved down) is cheap. Lazy
imports count too: deferring an import hides a cycle, it does not remove it.

What does not count: importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``; the
edge goes to ``a.b.c`` only, since a package ``__init__`` that re-exports its modules would
otherwise form a trivial cycle with each of them. Name tables resolved at attribute access
(the ``speedup`` facade's ``_EXPORTS``, ``speedup.functional``'s twins) are not edges either;
instead :func:`test_package_facade_is_not_used_inside` forbids the package's own modules to
reach anything through the ``speedup`` facade but ``__version__``.

Modules are named from files with the package-dir map in pyproject.toml, as installed.
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent

#: The layers, lowest first. A module may import its own layer and the layers below it, with
#: one exception: the algorithms depend on the core only (ALLOWED below). Why each is where:
#:
#: * core: the training machinery every other part stands on. ``speedup`` (the package) holds
#:   ``__version__`` and a lazy facade (name table, no import); ``errors`` is the leaf of every
#:   exception class; ``model`` the Model protocol the trainer drives (with the Hugging Face
#:   adapter user models go through, and ``ResidualBlock`` for algorithms doing surgery);
#:   ``logger`` the Logger that algorithms and callbacks receive, ``loggers`` and
#:   ``callbacks`` the built-in destinations and callbacks; ``conformance`` the declaration
#:   checks that ``Engine(check_declarations=True)`` runs; ``adapters`` turns what users pass
#:   to ``Trainer`` (plain nn.Module, HF model, names) into core objects, its arguments
#:   checked by ``arguments`` (as recipes' are); ``optim``,
#:   ``surgery`` and ``guard`` serve algorithms and the trainer alike.
#: * workloads: the data and model registries and their built-ins (datasets, networks).
#: * algorithms: the built-in speedups, and ``speedup.functional``, the facade over their
#:   functional twins. They see only the core, so a third-party algorithm can do whatever a
#:   built-in does.
#: * recipes: YAML -> objects -> Trainer (``config``, ``run``) and what works on a run's
#:   artefacts (``export``, ``run_report``, ``listing`` of components and recipes, the
#:   ``launch`` of torchrun); ``testing``, the conformance kit, builds workload models and
#:   data to exercise an algorithm.
#: * experiments: lottery tickets, the benchmark harness and the tuner, built on recipes.
#: * cli: the top, wiring everything.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": (
        "speedup",
        "speedup.adapters",
        "speedup.algorithm",
        "speedup.arguments",
        "speedup.callback",
        "speedup.callbacks",
        "speedup.checkpoint",
        "speedup.conformance",
        "speedup.distributed",
        "speedup.engine",
        "speedup.errors",
        "speedup.event",
        "speedup.guard",
        "speedup.lock",
        "speedup.logger",
        "speedup.loggers",
        "speedup.model",
        "speedup.optim",
        "speedup.registry",
        "speedup.state",
        "speedup.surgery",
        "speedup.time",
        "speedup.trainer",
    ),
    "workloads": ("speedup.data", "speedup.data.*", "speedup.models", "speedup.models.*"),
    "algorithms": ("speedup.algorithms", "speedup.algorithms.*", "speedup.functional"),
    "recipes": (
        "speedup.config",
        "speedup.export",
        "speedup.launch",
        "speedup.listing",
        "speedup.recipes",
        "speedup.recipes.*",
        "speedup.run",
        "speedup.run_report",
        "speedup.testing",
    ),
    "experiments": (
        "speedup.benchmarks",
        "speedup.benchmarks.*",
        "speedup.lottery",
        "speedup.lottery.*",
        "speedup.tuning",
        "speedup.tuning.*",
    ),
    "cli": ("speedup.cli", "speedup.__main__"),
}

#: The layers each layer may import (besides its own). The algorithms' row is the point: core
#: only, never a workload, recipe or harness.
ALLOWED: dict[str, frozenset[str]] = {
    name: frozenset(list(LAYERS)[:rank]) for rank, name in enumerate(LAYERS)
}
ALLOWED["algorithms"] = frozenset({"core"})


# -- the graph --------------------------------------------------------------------------------


def package_modules(root: Path) -> dict[str, Path]:
    """Module name -> source file, for every .py under the package dirs of pyproject.toml."""
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    modules: dict[str, Path] = {}
    # Longest package first, so that a nested mapping wins over its parent's directory walk.
    for package, folder in sorted(package_dir.items(), key=lambda kv: -len(kv[0])):
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            modules.setdefault(name, path)
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(name: str, known: Mapping[str, object]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.c`` -> ``a.b``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def _imported_names(module: str, path: Path, tree: ast.AST) -> Iterable[tuple[str, int]]:
    """(dotted name, line) for every import in ``tree``; ``from m import n`` yields ``m.n``
    (a submodule if there is one; otherwise it resolves to ``m``)."""
    package = module if _is_package(path) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                yield (f"{base}.{alias.name}" if alias.name != "*" else base), node.lineno
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value, node.lineno


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {imported package module: first line}; imports outside the package dropped."""
    modules = package_modules(root)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: dict[str, int] = {}
        for name, line in _imported_names(module, path, tree):
            target = _resolve(name, modules)
            if target is not None and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


# -- the checks -------------------------------------------------------------------------------


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one
    (Tarjan's algorithm, iterative), so a report lists each tangle once."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))
    return [_cycle_through(graph, set(c)) for c in components]


def _cycle_through(graph: Mapping[str, Iterable[str]], component: set[str]) -> list[str]:
    """A concrete cycle inside a strongly connected component (shortest from its first
    member, by breadth-first search)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in component:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in component {sorted(component)}")


def layer_of(module: str, layers: Mapping[str, Iterable[str]] = LAYERS) -> str | None:
    for layer, patterns in layers.items():
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return layer
    return None


def upward_imports(
    graph: Mapping[str, Mapping[str, int]],
    layers: Mapping[str, Iterable[str]] = LAYERS,
    allowed: Mapping[str, frozenset[str]] = ALLOWED,
) -> list[str]:
    """Every import that runs against the layer direction, as ``a (layer) -> b (layer)``."""
    found = []
    for module in sorted(graph):
        own = layer_of(module, layers)
        for target, line in sorted(graph[module].items()):
            theirs = layer_of(target, layers)
            if own is None or theirs is None or own == theirs:
                continue
            if theirs not in allowed[own]:
                found.append(f"{module} ({own}) line {line} -> {target} ({theirs})")
    return found


# -- the package ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph()


def test_the_graph_sees_the_package(graph: dict[str, dict[str, int]]) -> None:
    # Known edges of each kind: top level, function-local, relative-free `from pkg import mod`,
    # and TYPE_CHECKING-only.
    assert "speedup.event" in graph["speedup.engine"]
    assert "speedup.trainer" in graph["speedup.run"]  # imported inside build_trainer
    assert "speedup.distributed" in graph["speedup.trainer"]  # `from speedup import distributed`
    assert "speedup.state" in graph["speedup.algorithm"]  # under TYPE_CHECKING
    assert "speedup.algorithms.label_smoothing" in graph
    assert "speedup.tuning.tune" in graph and "speedup.data.text" in graph


def test_every_module_has_a_layer(graph: dict[str, dict[str, int]]) -> None:
    assert [m for m in sorted(graph) if layer_of(m) is None] == []


def test_no_import_cycles(graph: dict[str, dict[str, int]]) -> None:
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_against_the_layers(graph: dict[str, dict[str, int]]) -> None:
    upward = upward_imports(graph)
    assert upward == [], "imports against the layer direction:\n" + "\n".join(upward)


def test_package_facade_is_not_used_inside() -> None:
    """``from speedup import X`` inside the package names a submodule or ``__version__``:
    anything else would go through the facade's lazy table, an import the graph cannot see."""
    modules = package_modules(ROOT)
    misuse = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "speedup" and not node.level:
                for alias in node.names:
                    if alias.name != "__version__" and f"speedup.{alias.name}" not in modules:
                        misuse.append(f"{module}:{node.lineno} from speedup import {alias.name}")
    assert misuse == []


def test_exceptions_live_in_the_leaf_module(graph: dict[str, dict[str, int]]) -> None:
    """Every exception class of the package is defined in speedup.errors, which imports
    nothing of the package (so raising one never loads YAML, torch or a registry). Private
    ones (``_SourceUnavailable``: control flow inside one module, never raised out of it)
    stay with their only user."""
    assert graph["speedup.errors"] == {}

    def exception_base(base: ast.expr) -> bool:
        name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
        return name.endswith(("Error", "Exception"))

    elsewhere = []
    for module, path in package_modules(ROOT).items():
        if module == "speedup.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ClassDef)
                and not node.name.startswith("_")
                and any(exception_base(b) for b in node.bases)
            ):
                elsewhere.append(f"{module}.{node.name}")
    assert elsewhere == []


# -- the checker itself -----------------------------------------------------------------------


def test_checker_finds_a_planted_cycle() -> None:
    planted = {
        "p.a": {"p.b": 1},
        "p.b": {"p.c": 1},
        "p.c": {"p.a": 1, "p.d": 1},
        "p.d": {},
        "p.e": {"p.e": 1},  # a module importing itself is a cycle too
    }
    assert find_cycles(planted) == [["p.a", "p.b", "p.c", "p.a"], ["p.e", "p.e"]]
    del planted["p.c"]["p.a"]
    del planted["p.e"]["p.e"]
    assert find_cycles(planted) == []


def test_checker_finds_a_planted_upward_import() -> None:
    layers = {"low": ("p.low", "p.low.*"), "plugins": ("p.plug",), "high": ("p.high",)}
    allowed = {"low": frozenset(), "plugins": frozenset({"low"}), "high": frozenset({"low"})}
    planted = {
        "p.low": {"p.low.inner": 3},  # same layer: fine
        "p.low.inner": {"p.high": 7},  # upward
        "p.plug": {"p.low": 1},
        "p.high": {"p.low": 1, "p.plug": 2},  # 'high' may not use plugins in this table
    }
    assert upward_imports(planted, layers, allowed) == [
        "p.high (high) line 2 -> p.plug (plugins)",
        "p.low.inner (low) line 7 -> p.high (high)",
    ]


def test_checker_reads_every_import_form(tmp_path: Path) -> None:
    """Relative imports, imports in functions and under TYPE_CHECKING, and import_module."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "pkg" = "src", "pkg.extra" = "extra" }\n'
    )
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "extra").mkdir()
    (src / "__init__.py").write_text("")
    (src / "low.py").write_text("import os\n")
    (src / "sub" / "__init__.py").write_text("from . import leaf\n")
    (src / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..low import thing\n"
        "def f():\n    from pkg.extra.tool import g\n"
    )
    (tmp_path / "extra" / "__init__.py").write_text("")
    (tmp_path / "extra" / "tool.py").write_text(
        "import importlib\nimportlib.import_module('pkg.sub')\nfrom pkg import low\n"
    )
    graph = import_graph(tmp_path)
    assert sorted(graph) == [
        "pkg",
        "pkg.extra",
        "pkg.extra.tool",
        "pkg.low",
        "pkg.sub",
        "pkg.sub.leaf",
    ]
    assert graph["pkg.sub"] == {"pkg.sub.leaf": 1}
    assert graph["pkg.sub.leaf"] == {"pkg.low": 3, "pkg.extra.tool": 5}
    assert graph["pkg.extra.tool"] == {"pkg.sub": 2, "pkg.low": 3}
    assert find_cycles(graph) == [["pkg.extra.tool", "pkg.sub", "pkg.sub.leaf", "pkg.extra.tool"]]


def test_the_training_loop_reads_in_one_sitting() -> None:
    """Issue 17: the loop (``fit``) and the helpers it calls stay under 250 lines."""
    import speedup.trainer

    tree = ast.parse(Path(speedup.trainer.__file__).read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    methods = {n.name: n for n in trainer.body if isinstance(n, ast.FunctionDef)}
    loop = ["fit", "_train_batch", "_log_train", "eval", "_tick", "_untimed", "_done"]
    loop += ["_autocast", "_to_device", "_iterate_from", "_microbatches"]
    assert set(loop) <= set(methods), "the loop's helpers were renamed: update this list"
    lines = sum(methods[m].end_lineno - methods[m].lineno + 1 for m in loop)
    assert lines < 250, f"Trainer.fit and its helpers: {lines} lines"
