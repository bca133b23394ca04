"""The Logger: what algorithms and callbacks call to record a metric.

It fans each record out to destinations (:class:`~speedup.loggers.LoggerDestination`: the
JSONL file, the progress bar, TensorBoard, ...). Destinations are callbacks, and callbacks
take a Logger in every hook, so the Logger sees destinations only through the
:class:`Destination` protocol: this module sits below :mod:`speedup.callback` and
:mod:`speedup.loggers` and the import graph has no cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from speedup.state import State

__all__ = ["Destination", "Logger"]


class Destination(Protocol):
    """Where a Logger sends records (implemented by ``LoggerDestination``)."""

    def log_metrics(self, metrics: dict[str, float], state: State) -> None: ...

    def log_hyperparameters(self, params: dict[str, Any]) -> None: ...


class Logger:
    """What algorithms and callbacks call to record a metric."""

    def __init__(self, destinations: list[Destination] | None = None) -> None:
        self.destinations = list(destinations or [])
        self.state: State | None = None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        assert self.state is not None, "Logger is bound to a State by the Trainer"
        for destination in self.destinations:
            destination.log_metrics(metrics, self.state)

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        for destination in self.destinations:
            destination.log_hyperparameters(params)
