"""What ``speedup list`` prints, read without importing the components (and so without torch).

A registry's names and one-line summaries are facts about source code: which top-level
definitions carry ``@MODELS.register("name")``, which entry points name which class, and
each definition's docstring. This module reads them with :mod:`ast` from the modules'
source files, found through the import system's finders without executing any module.
Built-ins and plugins are read the same way; where a source file cannot be read (a
compiled-only install) or a name is not a plain top-level definition, it falls back to
importing, so the listing is always the registry's own.

Optimizer names come from torch and torch-optimizer at import time, so they are computed
once per installed pair of versions and kept in the cache directory.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

__all__ = ["listing", "plain_text", "summary"]

#: kind -> (registry variable, entry-point group, module that defines the registry)
_REGISTRIES = {
    "algorithms": ("ALGORITHMS", "speedup.algorithms", "speedup.algorithm"),
    "callbacks": ("CALLBACKS", "speedup.callbacks", "speedup.callback"),
    "models": ("MODELS", "speedup.models", "speedup.models"),
    "datasets": ("DATASETS", "speedup.datasets", "speedup.data"),
}


class _SourceUnavailable(Exception):
    """A module's source cannot be read statically; the caller imports instead."""


def listing(kind: str) -> list[tuple[str, str]]:
    """``(name, summary)`` for every registered ``kind``, sorted as the registry sorts them
    (recipes, optimizers and schedules have their own order). The summary is the first
    sentence of the docstring (of a recipe: of its header comment) as plain text, whole
    however long: :func:`summary`."""
    if kind == "recipes":
        return _recipes()
    if kind == "optimizers":
        return [(n, "") for n in _optimizer_names()]
    if kind == "schedules":
        return [(n, "") for n in _schedule_names()]
    variable, group, home = _REGISTRIES[kind]
    try:
        found = _registered(variable, home)
    except _SourceUnavailable:
        return _imported_listing(kind)
    for ep in _entry_points(group):
        if ep.name in found:  # the registry keeps a built-in over a same-named plugin
            continue
        try:
            found[ep.name] = _entry_point_summary(ep)
        except Exception as err:  # a broken plugin must not hide the rest: list them, warn once
            warn_broken_plugin(ep, err)
    return sorted(found.items())


_WARNED: set[tuple[str, str]] = set()


def warn_broken_plugin(ep: object, err: BaseException) -> None:
    """One line on stderr, once per plugin and process: which entry point, from which
    distribution, and why it cannot be loaded."""
    name, value = getattr(ep, "name", "?"), getattr(ep, "value", "?")
    if (name, value) in _WARNED:
        return
    _WARNED.add((name, value))
    dist = getattr(getattr(ep, "dist", None), "name", None)
    source = f" from {dist}" if dist else ""
    group = getattr(ep, "group", "")
    print(
        f"warning: plugin {name!r} ({group} entry point {value}{source}) cannot be loaded, "
        f"skipped: {type(err).__name__}: {err}",
        file=sys.stderr,
    )


# -- finding and parsing source without importing ----------------------------------------------


_ALL_ENTRY_POINTS: list = []


def _entry_points(group: str) -> list:
    """The group's entry points; the installed distributions are scanned once per process
    (each ``entry_points(group=...)`` call would read every distribution's metadata again)."""
    if not _ALL_ENTRY_POINTS:
        _ALL_ENTRY_POINTS.append(entry_points())
    return list(_ALL_ENTRY_POINTS[0].select(group=group))


def _find_spec(fullname: str) -> ModuleSpec | None:
    """The module's spec, as ``importlib.util.find_spec`` would give, without importing the
    parent packages (their ``__init__`` may import torch)."""
    module = sys.modules.get(fullname)
    if module is not None:
        return getattr(module, "__spec__", None)
    parent, _, _ = fullname.rpartition(".")
    path = None
    if parent:
        parent_spec = _find_spec(parent)
        if parent_spec is None or parent_spec.submodule_search_locations is None:
            return None
        path = list(parent_spec.submodule_search_locations)
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        spec = find(fullname, path)
        if spec is not None:
            return spec
    return None


def _parse(fullname: str) -> ast.Module:
    spec = _find_spec(fullname)
    origin = spec.origin if spec is not None else None
    if not origin or not origin.endswith(".py"):
        raise _SourceUnavailable(fullname)
    try:
        source = Path(origin).read_text(encoding="utf-8")
        return ast.parse(source, filename=origin)
    except (OSError, SyntaxError, ValueError) as err:
        raise _SourceUnavailable(fullname) from err


# Inline reStructuredText, in the order it must be matched: a literal first (its content is
# never re-read, so ``*.JPEG`` inside one stays), then roles, links, strong, emphasis, interpreted.
_INLINE_RST = re.compile(
    r"``(?P<literal>.+?)``"
    r"|:(?P<rolename>[\w:.+-]+):`(?P<role>[^`]+)`"
    r"|`(?P<link>[^`<]+?)\s*(?:<[^`>]*>)?`__?"
    r"|\*\*(?P<strong>[^*]+?)\*\*"
    r"|(?<![\w*/\\])\*(?P<emphasis>[^*\s](?:[^*]*?[^*\s])?)\*(?![\w*])"
    r"|`(?P<interpreted>[^`]+)`",
    re.S,
)
# A sentence ends at . ! or ? (and any closing bracket or quote) before a space, except after
# these abbreviations or a lone initial ("J. Frankle").
_SENTENCE_END = re.compile(r"[.!?][)\]\"']*(?=\s)")
_ABBREVIATIONS = frozenset(
    {"e.g.", "i.e.", "al.", "cf.", "vs.", "fig.", "figs.", "eq.", "eqs.", "sec.", "no.", "approx."}
)


def _plain_inline(match: re.Match[str]) -> str:
    kind = match.lastgroup
    text = match.group(kind)
    if kind == "role":  # :func:`~a.b.f` -> f(), :class:`text <target>` -> text
        labelled = re.fullmatch(r"\s*(.*?)\s*<[^<>]*>\s*", text, flags=re.S)
        if labelled:
            return labelled.group(1)
        name = text[1:].rpartition(".")[2] if text.startswith("~") else text
        # Sphinx shows a function as f(); a terminal reader gets the same hint.
        callable_role = match.group("rolename").rpartition(":")[2] in ("func", "meth")
        return f"{name}()" if callable_role and not name.endswith(")") else name
    return text


def plain_text(rst: str) -> str:
    """reStructuredText as a terminal shows it well: inline markup removed (````x````,
    ``:func:`~m.f```, ``**x**``, ``*x*``, ```text <url>`_``), a paragraph's closing ``::``
    turned into ``:``, and ``..`` directives and comments dropped with their indented body.
    Line breaks and indentation are kept."""
    lines: list[str] = []
    skipping_indent: int | None = None
    for line in rst.splitlines():
        indent = len(line) - len(line.lstrip())
        if skipping_indent is not None:
            if not line.strip() or indent > skipping_indent:
                continue
            skipping_indent = None
        if line.lstrip().startswith(".. "):
            skipping_indent = indent
            continue
        if line.strip() == "::":
            continue
        if line.rstrip().endswith("::"):
            line = line.rstrip()[:-2].rstrip()
            line = line + ":" if line and line[-1].isalnum() else line
        lines.append(_INLINE_RST.sub(_plain_inline, line))
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def summary(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, as plain text on one line (a
    paragraph without a sentence end is taken whole): what ``speedup list`` shows."""
    text = (doc or "").strip()
    if not text:
        return ""
    paragraph = re.split(r"\n\s*\n", text, maxsplit=1)[0]
    flat = " ".join(plain_text(paragraph).split())
    for end in _SENTENCE_END.finditer(flat):
        word = flat[: end.end()].rsplit(None, 1)[-1].lstrip("([\"'")
        if word.lower() in _ABBREVIATIONS or re.fullmatch(r"[A-Z]\.", word):
            continue
        return flat[: end.end()]
    return flat


def _definitions(tree: ast.Module) -> Iterator[ast.ClassDef | ast.FunctionDef]:
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node  # type: ignore[misc]


def _registered_name(decorator: ast.expr, variable: str) -> str | None:
    """``"x"`` for a decorator ``@VARIABLE.register("x", ...)``, else None."""
    if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)):
        return None
    func = decorator.func
    if func.attr != "register" or not isinstance(func.value, ast.Name):
        return None
    if func.value.id != variable or not decorator.args:
        return None
    name = decorator.args[0]
    return name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) else None


def _imported_modules(tree: ast.Module, fullname: str, is_package: bool) -> list[str]:
    """The ``speedup`` modules a module imports at its top level (what runs on import)."""
    package = fullname if is_package else fullname.rpartition(".")[0]
    modules = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if not _ours(base):
                continue
            modules.append(base)
            modules += [f"{base}.{alias.name}" for alias in node.names]  # submodules, if any
        elif isinstance(node, ast.Import):
            modules += [a.name for a in node.names if _ours(a.name)]
    return modules


def _ours(module: str) -> bool:
    return module == "speedup" or module.startswith("speedup.")


def _registered(variable: str, home: str) -> dict[str, str]:
    """Names registered with ``@VARIABLE.register(...)`` by importing ``home``: the module
    itself and, transitively, the speedup modules it imports at top level."""
    found: dict[str, str] = {}
    seen: set[str] = set()
    pending = [home]
    while pending:
        fullname = pending.pop()
        if fullname in seen:
            continue
        seen.add(fullname)
        spec = _find_spec(fullname)
        if spec is None:  # ``from pkg import name`` where name is not a module
            if fullname == home:
                raise _SourceUnavailable(fullname)
            continue
        tree = _parse(fullname)
        for node in _definitions(tree):
            for decorator in node.decorator_list:
                name = _registered_name(decorator, variable)
                if name is not None:
                    found[name] = summary(ast.get_docstring(node, clean=False))
        is_package = spec.submodule_search_locations is not None
        pending += _imported_modules(tree, fullname, is_package)
    return found


def _entry_point_summary(ep: object) -> str:
    module, _, attr = ep.value.partition(":")  # type: ignore[attr-defined]
    attr = attr.strip()
    if attr and "." not in attr:
        try:
            nodes = [n for n in _definitions(_parse(module.strip())) if n.name == attr]
        except _SourceUnavailable:
            nodes = []
        if nodes:  # the last definition is the one the module leaves bound
            return summary(ast.get_docstring(nodes[-1], clean=False))
    return summary(getattr(ep.load(), "__doc__", None))  # type: ignore[attr-defined]


def _imported_listing(kind: str) -> list[tuple[str, str]]:
    """The listing the slow way, importing every component."""
    if kind == "algorithms":
        from speedup.algorithm import ALGORITHMS as registry
    elif kind == "callbacks":
        from speedup.callback import CALLBACKS as registry
    elif kind == "models":
        from speedup.models import MODELS as registry
    else:
        from speedup.data import DATASETS as registry
    rows = []
    for name in registry.names():
        try:
            rows.append((name, summary(getattr(registry.get(name), "__doc__", None))))
        except Exception as err:  # a broken plugin: warn once, list the rest
            warn_broken_plugin(registry.entry_point(name) or name, err)
    return rows


# -- recipes, schedules, optimizers --------------------------------------------------------------


def _recipes() -> list[tuple[str, str]]:
    """Shipped recipes (``speedup.config.recipe_names()``) and their headers' first sentence."""
    spec = _find_spec("speedup.recipes")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if folders:
        paths = sorted(Path(folders[0]).glob("*.yaml"), key=lambda p: p.stem)
    else:  # an unusual install: ask importlib.resources through the config module
        from speedup.config import recipe_names, resolve_recipe

        paths = [resolve_recipe(name) for name in recipe_names()]
    return [(path.stem, _recipe_summary(path.read_text(encoding="utf-8"))) for path in paths]


def _recipe_summary(text: str) -> str:
    """The first sentence of a recipe's leading comment block (its header)."""
    header: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            header.append(line[1:].strip())
        elif header or line.strip():  # the block ends at its first other line
            break
    return summary("\n".join(header))


def _schedule_names() -> list[str]:
    """The keys of ``speedup.optim.SCHEDULES``, in their order, read from the source."""
    try:
        tree = _parse("speedup.optim")
    except _SourceUnavailable:
        tree = None
    for node in tree.body if tree is not None else []:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        value = getattr(node, "value", None)
        if (
            isinstance(target, ast.Name)
            and target.id == "SCHEDULES"
            and isinstance(value, ast.Dict)
        ):
            keys = [k.value if isinstance(k, ast.Constant) else None for k in value.keys]
            if all(isinstance(k, str) for k in keys):
                return keys  # type: ignore[return-value]
    from speedup.optim import SCHEDULES

    return list(SCHEDULES)


def _cache_dir() -> Path:
    """``$SPEEDUP_CACHE`` if set, else ``~/.cache/speedup`` (as for the data cache)."""
    env = os.environ.get("SPEEDUP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "speedup"


def _installed(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "absent"


def _optimizer_names() -> list[str]:
    """``speedup.optim.optimizer_names()``, cached per (torch, torch-optimizer, optim.py)."""
    spec = _find_spec("speedup.optim")
    try:
        own = Path(spec.origin).read_bytes() if spec and spec.origin else b""
    except OSError:
        own = b""
    key = hashlib.sha256(
        b"\0".join([_installed("torch").encode(), _installed("torch-optimizer").encode(), own])
    ).hexdigest()[:16]
    path = _cache_dir() / "listing" / f"optimizers-{key}.json"
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    except (OSError, ValueError):
        pass
    from speedup.optim import optimizer_names

    names = optimizer_names()
    try:  # best effort: a read-only home just means the next listing imports again
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(names) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass
    return names
