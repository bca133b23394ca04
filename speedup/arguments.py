"""Keyword arguments checked against a signature, for every component built by name.

Recipes (``speedup.config``) and the Trainer's ``algorithms=[{name: kwargs}]``
(``speedup.adapters``) build components from user-given arguments; both check them here
first, so a wrong name or type is an error naming the key rather than a ``TypeError`` deep in
a constructor. In the core so that the Trainer needs nothing of the recipe layer.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from speedup.errors import ConfigError
from speedup.registry import suggest

__all__ = ["check_arguments"]


def check_arguments(
    fn: Any, args: dict[str, Any], section: str, source: str, skip: tuple[str, ...] = ()
) -> None:
    """Check ``args`` against ``fn``'s signature (a class's ``__init__``): an unknown name, a
    value of the wrong type or a missing required argument is a :class:`ConfigError` naming
    ``section.key`` and ``source`` (the file or the caller that gave it)."""
    from speedup.optim import type_problem  # optim imports torch; recipes load without it

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
