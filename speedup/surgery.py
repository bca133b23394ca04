"""Model surgery: swap submodules of a model in place.

Algorithms that change a network's layers (BlurPool, GhostBatchNorm, low-precision norms,
squeeze-excite, stochastic depth) share one replacement walk, so they all treat a module
reachable under several names (tied or shared submodules) the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["replace_modules"]


def replace_modules(
    model: nn.Module,
    build: Callable[[nn.Module], nn.Module | None],
    *,
    skip_children_of: type[nn.Module] | tuple[type[nn.Module], ...] = (),
) -> list[str]:
    """Replace, in place, every submodule of ``model`` for which ``build`` returns a module.

    ``build(child)`` returns the replacement, or ``None`` to keep ``child``. The walk covers
    the modules present when it starts (replacements are not visited). Each distinct module
    is built once: a module shared by several parents (or under several names) becomes one
    replacement under all of its names. Children whose first parent in model order is an
    instance of ``skip_children_of`` are kept everywhere (for example the layer that an
    earlier application already wrapped). The root ``model`` itself is never replaced.

    Returns the qualified names of the replaced modules, one per distinct module (the first
    name it was found under), so ``len()`` is the number replaced. They come in walk order:
    parents in model order, each parent's direct children before its grandchildren.
    """
    built: dict[int, nn.Module | None] = {}
    names: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if id(child) not in built:
                skip = isinstance(parent, skip_children_of)
                built[id(child)] = None if skip else build(child)
                if built[id(child)] is not None:
                    names.append(f"{parent_name}.{name}" if parent_name else name)
            new = built[id(child)]
            if new is not None:
                setattr(parent, name, new)
    return names
