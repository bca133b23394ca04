"""The built-in algorithms, one module each: ``from speedup.algorithms import LabelSmoothing``.

Each class is imported from its module on first use (a module ``__getattr__``, PEP 562), so
``import speedup.algorithms`` stays free of torch and ``speedup --help`` stays fast. Which
module holds which name is read from the modules' source (their ``__all__`` and class
definitions, with :mod:`ast`), so a new module needs no entry here. The functional twins
are in :mod:`speedup.functional`; the registry by name is
:data:`speedup.algorithm.ALGORITHMS`.
"""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

#: The names every module of this package exports through ``__all__``, in two kinds.
Catalogue = tuple[dict[str, str], dict[str, str]]


def _read_source(module: str) -> tuple[list[str], dict[str, set[str]]] | None:
    """``(__all__, {top-level class: names of its bases})`` of ``module``, from its source;
    None when there is no source file or ``__all__`` is not a literal list of names."""
    for folder in __path__:
        path = Path(folder) / f"{module}.py"
        if path.is_file():
            break
    else:
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    exports = None
    classes: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            classes[node.name] = {
                base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
                for base in node.bases
            }
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            try:
                exports = list(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None if exports is None else (exports, classes)


def _read_imported(module: str) -> tuple[list[str], set[str]]:
    """``(__all__, the Algorithm classes among them)`` by importing ``module`` (the fallback
    where its source cannot be read statically)."""
    from speedup.algorithm import Algorithm

    loaded = importlib.import_module(f"{__name__}.{module}")
    exports = list(getattr(loaded, "__all__", ()))
    found = {
        n
        for n in exports
        if isinstance(getattr(loaded, n, None), type) and issubclass(getattr(loaded, n), Algorithm)
    }
    return exports, found


@functools.cache
def catalogue() -> Catalogue:
    """``(classes, twins)``: each Algorithm class in a module's ``__all__`` -> its module,
    and every other name there (functional twins, the modules and constants they use) -> its
    module. A name exported by two modules is an error: importing it would be ambiguous."""
    read = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            read[info.name] = _read_source(info.name)
    # Algorithm subclasses: classes whose bases are Algorithm or, transitively, one of them
    # (MixUp and CutMix derive from MixingAlgorithm, which derives from Algorithm).
    algorithm = {"Algorithm"}
    grown = True
    while grown:
        grown = False
        for found in read.values():
            for name, bases in (found[1] if found else {}).items():
                if name not in algorithm and bases & algorithm:
                    algorithm.add(name)
                    grown = True
    classes: dict[str, str] = {}
    twins: dict[str, str] = {}
    for module, found in sorted(read.items()):
        if found is None:
            exports, algorithm_classes = _read_imported(module)
        else:
            exports = found[0]
            algorithm_classes = {n for n in exports if n in found[1] and n in algorithm}
        for name in exports:
            table = classes if name in algorithm_classes else twins
            if table.get(name, module) != module:
                raise ImportError(
                    f"{name!r} is exported by both speedup.algorithms.{table[name]} and "
                    f"speedup.algorithms.{module}; rename one"
                )
            table[name] = module
    return classes, twins


def _lazy_export(namespace: dict[str, Any], table: Mapping[str, str], name: str) -> Any:
    """The PEP 562 ``__getattr__`` of this package and of :mod:`speedup.functional`: ``name``
    imported from the module of this package that ``table`` names for it, and kept in
    ``namespace`` (the asking module's globals) so that later look-ups skip ``__getattr__``."""
    module = table.get(name)
    if module is None:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    namespace[name] = value
    return value


def __getattr__(name: str) -> Any:
    if name == "__all__":  # for `from speedup.algorithms import *`
        return sorted(catalogue()[0])
    # Dunder probes (by inspect, pytest...) and `from speedup.algorithms import <submodule>`,
    # which asks here before importing the submodule, need no reading of the sources.
    if name.startswith("__") or any((Path(p) / f"{name}.py").is_file() for p in __path__):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _lazy_export(globals(), catalogue()[0], name)


def __dir__() -> list[str]:
    return sorted({*globals(), *catalogue()[0]})
