"""The training state: a plain dataclass that algorithms and callbacks read and write."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from speedup.time import Time, TimeConverter, Timestamp, TimeUnit

if TYPE_CHECKING:
    from speedup.model import Model

__all__ = ["AlgorithmLike", "CallbackLike", "State"]


class CallbackLike(Protocol):
    """What the state knows of a callback: its checkpointed state.

    Algorithms and callbacks take a :class:`State` in every hook, so the state names them
    only by these protocols (implemented by :class:`~speedup.algorithm.Algorithm` and
    :class:`~speedup.callback.Callback`): it sits below both in the import graph."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AlgorithmLike(CallbackLike, Protocol):
    """What the state knows of an algorithm: its registry name and checkpointed state."""

    @property
    def name(self) -> str: ...


@dataclass
class State:
    """Everything a step of training can see.

    ``batch`` is a dict of tensors: vision ``{"inputs", "targets"}``, language models
    ``{"input_ids", "attention_mask", "labels"}``. During the microbatch events it holds the
    current microbatch. ``loss`` is the current microbatch's unscaled mean loss.
    """

    model: Model
    max_duration: Time
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    optimizer: torch.optim.Optimizer | None = None
    schedulers: list[Any] = field(default_factory=list)
    scaler: torch.amp.GradScaler | None = None
    train_dataloader: Any = None
    eval_dataloader: Any = None
    converter: TimeConverter | None = None
    timestamp: Timestamp = field(default_factory=Timestamp)
    batch: dict[str, torch.Tensor] | None = None
    outputs: Any = None
    loss: torch.Tensor | None = None
    algorithms: list[AlgorithmLike] = field(default_factory=list)
    callbacks: list[CallbackLike] = field(default_factory=list)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    #: The last batch's training metrics as tensors (``loss``: kept on the device, so a step
    #: needs no host sync; loggers and the guard read it when they need a number).
    train_metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Surviving-weight masks by parameter name (bool tensors), written by pruning algorithms
    #: and read by those that must respect sparsity (rewinding, weight averaging).
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The batch count at which ``masks`` last changed (None: never).
    masks_updated_at: int | None = None
    #: The batch count of the last evaluation (None: not evaluated in this run yet).
    evaluated_at: int | None = None
    stop_requested: bool = False
    stop_reason: str = ""
    #: Stopped by a signal (SIGTERM/SIGINT) after a checkpoint: the run is incomplete, so the
    #: final evaluation is skipped and no summary is written.
    preempted: bool = False

    def stop_training(self, reason: str = "") -> None:
        """Ask the trainer to stop after the current batch."""
        self.stop_requested = True
        self.stop_reason = reason

    @property
    def elapsed_fraction(self) -> float:
        """How much of ``max_duration`` has passed, in [0, 1] (1 when done)."""
        unit, ts = self.max_duration.unit, self.timestamp
        done = ts.get(unit)
        if unit == TimeUnit.EPOCH and self.converter is not None:  # count partial epochs
            done = ts.epoch + ts.batch_in_epoch / self.converter.batches_per_epoch
        return min(1.0, done / self.max_duration.value) if self.max_duration.value else 1.0

    def batch_size(self) -> int:
        """Samples in the current batch (the first tensor's leading dimension)."""
        assert self.batch is not None
        return int(next(iter(self.batch.values())).shape[0])
