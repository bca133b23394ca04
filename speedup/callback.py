"""Callbacks observe training; they run after the algorithms at each event.

Override a method named after the event (``def batch_end(self, state, logger)``); the engine
calls only the methods a callback overrides, so an unused hook costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from speedup.event import Event

if TYPE_CHECKING:
    from speedup.logger import Logger
    from speedup.registry import Registry
    from speedup.state import State

__all__ = ["Callback"]


class Callback:
    """Base class: one no-op method per :class:`Event`, plus state for checkpoints."""

    def hooks(self) -> dict[Event, Callable[[State, Logger], None]]:
        """The bound methods this callback overrides, by event."""
        found: dict[Event, Callable[[State, Logger], None]] = {}
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

    # One no-op hook per Event, in firing order (speedup.event documents each contract).

    def init(self, state: State, logger: Logger) -> None:
        """Once in ``Trainer.__init__``, after the State exists, before the optimizer."""

    def after_load(self, state: State, logger: Logger) -> None:
        """Once at the first ``fit()``, after the optimizer and any checkpoint are loaded."""

    def fit_start(self, state: State, logger: Logger) -> None:
        """At the start of each ``fit()``; dataloaders and the time converter are final."""

    def epoch_start(self, state: State, logger: Logger) -> None:
        """At the start of each epoch, before the dataloader iterator is created."""

    def before_dataloader(self, state: State, logger: Logger) -> None:
        """Before the next batch is drawn."""

    def after_dataloader(self, state: State, logger: Logger) -> None:
        """The new full batch is in ``state.batch``, on the training device."""

    def batch_start(self, state: State, logger: Logger) -> None:
        """Right after AFTER_DATALOADER; the batch is final."""

    def before_train_batch(self, state: State, logger: Logger) -> None:
        """Before gradients are zeroed and the microbatch loop runs."""

    def before_forward(self, state: State, logger: Logger) -> None:
        """Per microbatch, before the forward pass."""

    def after_forward(self, state: State, logger: Logger) -> None:
        """Per microbatch: ``state.outputs`` holds the model outputs."""

    def before_loss(self, state: State, logger: Logger) -> None:
        """Per microbatch: outputs exist, the loss does not."""

    def after_loss(self, state: State, logger: Logger) -> None:
        """Per microbatch: ``state.loss`` is the microbatch's mean loss, unscaled."""

    def before_backward(self, state: State, logger: Logger) -> None:
        """Per microbatch, just before ``backward``."""

    def after_backward(self, state: State, logger: Logger) -> None:
        """Per microbatch: this microbatch's gradients are accumulated."""

    def after_train_batch(self, state: State, logger: Logger) -> None:
        """All microbatches done; the full gradient is ready, before the step."""

    def batch_end(self, state: State, logger: Logger) -> None:
        """After the optimizer step, the scheduler step and the timestamp advance."""

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        """After BATCH_END and any evaluation for this batch; metrics are fresh."""

    def epoch_end(self, state: State, logger: Logger) -> None:
        """After the last batch of an epoch and the epoch counter advance."""

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        """After EPOCH_END and any epoch evaluation."""

    def eval_start(self, state: State, logger: Logger) -> None:
        """Before an evaluation pass; the model is in eval mode."""

    def eval_batch_start(self, state: State, logger: Logger) -> None:
        """An eval batch is in ``state.batch`` on the device."""

    def eval_before_forward(self, state: State, logger: Logger) -> None:
        """Just before the eval forward."""

    def eval_after_forward(self, state: State, logger: Logger) -> None:
        """``state.outputs`` holds the eval outputs."""

    def eval_batch_end(self, state: State, logger: Logger) -> None:
        """The eval batch's metrics are accumulated."""

    def eval_end(self, state: State, logger: Logger) -> None:
        """``state.eval_metrics`` holds the finished metrics of this pass."""

    def fit_end(self, state: State, logger: Logger) -> None:
        """After the last batch and the final evaluation; state is final."""


def _callback_registry() -> Registry[type[Callback]]:
    from speedup.registry import Registry

    return Registry("callback", group="speedup.callbacks")


#: Callbacks by name, for recipes' ``callbacks:`` section; plugins use the entry-point group
#: ``speedup.callbacks``.
CALLBACKS = _callback_registry()
