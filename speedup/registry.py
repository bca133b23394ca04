"""Name -> component registries, with entry-point plugins and did-you-mean errors."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from speedup.errors import PluginLoadError, UnknownNameError

__all__ = ["PluginLoadError", "Registry", "UnknownNameError", "suggest"]

T = TypeVar("T")


def suggest(name: str, choices: list[str]) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """Components by name. ``group`` names an entry-point group scanned lazily on first lookup,
    so third-party packages register exactly as built-ins do."""

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._items: dict[str, T] = {}
        self._entry_points_loaded = group is None

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator; ``meta`` (e.g. ``kind="cnn"``) is set as attributes on the item."""

        def add(item: T) -> T:
            for key, value in meta.items():
                setattr(item, key, value)
            self._items[name] = item
            return item

        return add

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            self._items.setdefault(ep.name, ep)  # resolved on first use

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        self._load_entry_points()
        if name not in self._items:
            names = self.names()
            listing = ", ".join(names) if names else "(none registered)"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{suggest(name, names)}; available: {listing}"
            )
        item: Any = self._items[name]
        if _is_entry_point(item):  # not yet imported
            try:
                loaded = item.load()
            except Exception as err:  # name the plugin, not just the missing module
                raise PluginLoadError(
                    f"{self.kind} {name!r} is a plugin ({item.value}) that cannot be loaded: "
                    f"{type(err).__name__}: {err}"
                ) from err
            item = self._items[name] = loaded
        return item

    def entry_point(self, name: str) -> Any | None:
        """The entry point behind ``name`` while it is not yet imported, else None."""
        self._load_entry_points()
        item = self._items.get(name)
        return item if _is_entry_point(item) else None


def _is_entry_point(item: object) -> bool:
    return hasattr(item, "load") and hasattr(item, "group")
