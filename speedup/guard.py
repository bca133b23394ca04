"""The NaN/Inf guard: a non-finite training loss never reaches the weights.

It checks each batch's loss (summed over processes in a distributed run, so that all of them
decide alike) after the backward pass and before the optimizer step. In
``stop`` mode it raises :class:`NonFiniteLossError` naming the step, before the step is taken,
so nothing after the last good checkpoint is written. In ``skip`` mode it drops the batch's
gradients (torch optimizers leave parameters without a gradient untouched: no update, no
momentum or weight decay) and training goes on; skips are counted and logged.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

from speedup import distributed
from speedup.callback import Callback

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "NONFINITE_MODES"]

NONFINITE_MODES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (the run stopped before updating weights)."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class NonFiniteGuard(Callback):
    """Stops the run, or skips the batch, when the training loss is NaN or infinite."""

    def __init__(self, mode: str = "stop") -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite: {mode!r} is not allowed; allowed: stop, skip")
        self.mode = mode
        self.skipped = 0

    def after_train_batch(self, state: State, logger: Logger) -> None:
        loss = state.train_metrics["loss"]
        if distributed.is_distributed():  # every process must take the same decision
            loss = distributed.all_reduce_sum(loss.detach().float().reshape(1).clone())
        loss = float(loss)  # one host sync per batch
        if math.isfinite(loss):
            return
        ts = state.timestamp
        where = f"step {ts.batch + 1} (epoch {ts.epoch}, batch {ts.batch_in_epoch + 1} of it)"
        for group in state.optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        if self.mode == "stop":
            raise NonFiniteLossError(
                f"training loss is {loss} at {where}; stopped before the optimizer step, so the "
                "weights and the last checkpoint are untouched. Common causes: a learning rate "
                "too high for this batch size, fp16 without loss scaling, bad input data. Set "
                "nonfinite=skip to skip such batches instead.",
                step=ts.batch + 1,
            )
        self.skipped += 1
        logger.log_metrics({"nonfinite/skipped_batches": self.skipped})
        warnings.warn(f"training loss is {loss} at {where}: batch skipped", stacklevel=2)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = int(state.get("skipped", 0))
