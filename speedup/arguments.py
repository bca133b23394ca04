"""Keyword arguments checked against a signature, for every component built by name.

Recipes (``speedup.config``) and the Trainer's ``algorithms=[{name: kwargs}]``
(``speedup.adapters``) build components from user-given arguments; both check them here
first, so a wrong name or type is an error naming the key rather than a ``TypeError`` deep in
a constructor. In the core so that the Trainer needs nothing of the recipe layer.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from speedup.errors import ConfigError
from speedup.registry import suggest

__all__ = ["check_arguments", "type_problem", "value_fits"]


def check_arguments(
    fn: Any, args: dict[str, Any], section: str, source: str, skip: tuple[str, ...] = ()
) -> None:
    """Check ``args`` against ``fn``'s signature (a class's ``__init__``): an unknown name, a
    value of the wrong type or a missing required argument is a :class:`ConfigError` naming
    ``section.key`` and ``source`` (the file or the caller that gave it)."""
    target = fn.__init__ if isinstance(fn, type) else fn
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    params = {
        n: p
        for n, p in signature.parameters.items()
        if n not in ("self", *skip) and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    for key, value in args.items():
        if key not in params:
            if takes_kwargs:
                continue
            allowed = ", ".join(params) or "(no arguments)"
            raise ConfigError(
                f"{source}: {section}.{key}: unknown key{suggest(key, list(params))}; "
                f"allowed: {allowed}"
            )
        problem = type_problem(value, hints.get(key, params[key].annotation))
        if problem is not None:
            raise ConfigError(f"{source}: {section}.{key}: {problem}")
    missing = [
        n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in args
    ]
    if missing:
        raise ConfigError(f"{source}: {section}: missing required key(s) {', '.join(missing)}")


def value_fits(value: Any, annotation: Any) -> bool:
    """A lenient runtime check of ``value`` against an annotation of the shapes builders use
    (``float``, ``int | None``, ``Literal``, ``tuple[float, float]``, a class): a bool is not a
    number, an int is a float; containers are checked as containers, not element-wise."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(value_fits(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def type_problem(value: Any, annotation: Any) -> str | None:
    """``"wrong type: got ..., expected ..."`` when ``value`` does not fit ``annotation``,
    else None; the one wording of a wrong-type argument (recipes and the Trainer alike)."""
    if value_fits(value, annotation):
        return None
    shown = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    hint = ""
    if annotation is str and isinstance(value, (int, float)):
        hint = " (quote it: YAML reads 2:4 as the base-60 number 124, 1e3 as a number)"
    return f"wrong type: got {value!r}, expected {shown}{hint}"
