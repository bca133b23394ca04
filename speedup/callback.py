"""Callbacks observe training; they run after the algorithms at each event.

Override a method named after the event (``def batch_end(self, state, logger)``); the engine
calls only the methods a callback overrides, so an unused hook costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["Callback"]


class Callback:
    """Base class: one no-op method per :class:`Event`, plus state for checkpoints."""

    def hooks(self) -> dict[Event, Any]:
        """The bound methods this callback overrides, by event."""
        found = {}
        for event in Event:
            method = getattr(type(self), event.value, None)
            if method is not None and method is not getattr(Callback, event.value):
                found[event] = getattr(self, event.value)
        return found

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Release files and handles; called once after fit, even when it fails."""


def _noop(self: Callback, state: State, logger: Logger) -> None:
    return None


for _event in Event:
    setattr(Callback, _event.value, _noop)


def _callback_registry():
    from speedup.registry import Registry

    return Registry("callback", group="speedup.callbacks")


#: Callbacks by name, for recipes' ``callbacks:`` section; plugins use the entry-point group
#: ``speedup.callbacks``.
CALLBACKS = _callback_registry()
