"""A callback that logs the global L2 norm of the gradient the optimizer is about to use."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from speedup.callback import Callback

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["GradNormMonitor", "global_grad_norm"]


def global_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients together (0 when none has a gradient)."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


class GradNormMonitor(Callback):
    """Logs ``grad/norm``, the gradient's global L2 norm, every ``every`` batches.

    It hooks AFTER_TRAIN_BATCH, after every algorithm has run there, so it sees the gradient
    the optimizer steps with (clipped, noised, SAM's), not the raw one.
    """

    def __init__(self, every: int = 10) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"grad_norm_monitor.every must be an integer >= 1, got {every!r}")
        self.every = every

    def after_train_batch(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch % self.every == 0:
            logger.log_metrics({"grad/norm": global_grad_norm(state.model.parameters())})
