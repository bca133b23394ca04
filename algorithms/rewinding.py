"""Rewinding after pruning: weight rewinding, learning-rate rewinding, or fine-tuning.

**What.** When a pruning algorithm changes the masks at step ``P`` of a run that ends at step
``T``, the pruned network retrains for the rest of the run, ``t = T - P`` steps, in one of the
three ways that Renda et al. compare (ICLR 2020, "Comparing rewinding and fine-tuning in neural
network pruning"):

* ``weights``: reset the surviving weights (and buffers) to a snapshot taken at ``to`` and
  replay the LR schedule from ``to`` (below); ``to: 0ba`` is the initialisation, as in the
  lottery ticket hypothesis (Frankle & Carbin, ICLR 2019); a point early in training
  (``to: 500ba``) is "rewinding to iteration k", which finds tickets in deeper nets (Frankle et
  al., ICML 2020, "Linear mode connectivity and the lottery ticket hypothesis"). Optimizer
  state is cleared, as if training restarted there.
* ``lr``: keep the trained weights and replay the LR schedule from ``to`` exactly as weight
  rewinding does (Renda et al.'s definition of LR rewinding: the weights of fine-tuning, the
  schedule of weight rewinding; it matches or beats weight rewinding and beats fine-tuning at
  equal retraining budgets).
* ``finetune``: keep the weights and train on at the original schedule's final LR (Renda et
  al.'s fine-tuning control; Han et al. 2015), or at ``finetune_lr`` when given. A schedule
  that ends at 0 (cosine, linear to 0) would fine-tune at LR 0, so that is refused before
  training unless ``finetune_lr`` is set.

**The original schedule, and its tail.** Renda et al. retrain for ``t`` steps with the
learning-rate schedule of the last ``t`` steps of the original training: the retrain starts at
the schedule's value at the rewind point and ends where the original schedule ends. Here the
original schedule is the run's own configured schedule ``S`` over its whole ``max_duration``
(what the dense phase follows; the run is not shortened or re-planned by the pruning). Inside
one run the pruning cuts that training short at ``P``, so there is no completed training to
replay step for step: the schedule's tail from ``to`` to ``T`` is ``T - to`` steps long while
the retrain has ``T - P``. The retrain therefore follows that tail at the speed that fits it
into the steps left, the way a scale-schedule ratio does for a whole run: at step ``b >= P``
the LR is ``S(to + (b - P) * (T - to) / (T - P))``. It starts at ``S(to)``, passes every
milestone of the tail in order, and ends at ``S(T)``, the schedule's final value, as the run
without pruning does. When ``to == P`` this is the unchanged schedule; when the retrain is as
long as the tail (a lottery level, which is its own run from ``to`` to ``T``: see
:mod:`speedup.lottery.imp`) it is Renda et al.'s definition step for step. Each change of the
masks starts a new retrain, so under gradual pruning the replay restarts at every pruning step
and the last one anneals to the end.

Surviving weights equal the snapshot bit for bit after a weight rewind; pruned ones are zero.
The snapshot and the step of the latest pruning live in this algorithm's ``state_dict``.

**When it helps.** Sparse retraining: with a fixed budget, LR rewinding is the strongest
default; weight rewinding is the scientific tool (lottery tickets).

**Composes badly with.** Anything that holds its own copy of the weights (EMA/SWA) unless it
also resets at the rewind; schedules that are not functions of time; runs whose length is
wall-clock (``max_duration`` in ``sec``) when the LR follows a schedule, since the schedule's
end has no step to map the tail onto.

Functional twins: :func:`rewind_weights`, :func:`replayed_step`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.time import Time, TimeUnit

if TYPE_CHECKING:
    from collections.abc import Mapping

    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["Rewinding", "replayed_step", "rewind_weights"]

MODES = ("weights", "lr", "finetune")


@torch.no_grad()
def rewind_weights(
    model: torch.nn.Module,
    snapshot: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None = None,
) -> None:
    """Load ``snapshot`` into ``model`` in place, zeroing masked-out weights."""
    own = model.state_dict()
    for name, value in snapshot.items():
        target = own[name]
        if masks and name in masks:
            target.copy_(value * masks[name].to(value.dtype))
        else:
            target.copy_(value)


def replayed_step(step: float, pruned_at: float, rewind_to: float, end: float) -> float:
    """The step of the original schedule whose LR a retrain uses at ``step``.

    The retrain runs from ``pruned_at`` to ``end`` and follows the schedule's tail from
    ``rewind_to`` to ``end``, mapped linearly onto it: ``rewind_to`` at the pruning, ``end``
    at the end. Multiply a plain loop's base LR by ``schedule(replayed_step(...))``.
    """
    if end <= pruned_at:  # pruned at the very end: nothing left to retrain
        return end
    # multiply before dividing: integral steps map to integral ends exactly (end -> end)
    return rewind_to + (step - pruned_at) * (end - rewind_to) / (end - pruned_at)


class Rewinding(Algorithm):
    """How pruned networks retrain: rewind weights, rewind the LR schedule, or fine-tune."""

    name = "rewinding"

    def __init__(
        self, mode: str = "weights", to: str = "0ba", finetune_lr: float | None = None
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"rewinding.mode must be one of {', '.join(MODES)}, got {mode!r}")
        if finetune_lr is not None:
            if mode != "finetune":
                raise ValueError(
                    f"rewinding.finetune_lr is the LR of mode finetune only; mode {mode!r} "
                    "follows the schedule (drop finetune_lr, or set mode: finetune)"
                )
            if isinstance(finetune_lr, bool) or not isinstance(finetune_lr, (int, float)):
                raise TypeError(f"rewinding.finetune_lr must be a number, got {finetune_lr!r}")
            if not (math.isfinite(finetune_lr) and finetune_lr > 0):
                raise ValueError(
                    f"rewinding.finetune_lr must be a finite LR > 0, got {finetune_lr!r}"
                )
        self.mode = mode
        self.to = Time.parse(to)
        if self.to.unit == TimeUnit.SECOND:
            raise ValueError(
                f"rewinding.to: {to} is wall-clock, which has no step to rewind to; "
                "use ep, ba, sp, tok or dur"
            )
        self.finetune_lr = finetune_lr
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.retrain_from: int | None = None  # the step of the latest pruning
        self._to_batch = 0
        self._schedule = None  # the run's LR multiplier as a function of the step
        self._end: float | None = None  # the schedule's last step, T
        self._base_lrs: list[float] = []

    def declare(self) -> Declaration:
        return Declaration(
            events={
                Event.FIT_START: Access(reads={"model.weights", "lr"}),
                Event.BATCH_END: Access(
                    reads={"masks", "model.weights", "timestamp"},
                    writes={"model.weights", "optimizer", "lr"},
                ),
            },
            runs_after={"magnitude_pruning"},
        )

    def check_composition(self, algorithms: Mapping[str, Algorithm]) -> list[str]:
        pruners = [
            a
            for a in algorithms.values()
            if any("masks" in acc.writes for acc in a.declare().events.values())
        ]
        if not pruners:
            return ["needs a pruning algorithm (e.g. magnitude_pruning) to react to"]
        problems = []
        for pruner in pruners:
            first = getattr(pruner, "first_prune_time", lambda: None)()
            if first is not None and first.unit == self.to.unit and self.to > first:
                problems.append(
                    f"rewind point to={self.to} is later than {pruner.name}'s first pruning "
                    f"at {first}: the snapshot would not exist yet"
                )
        return problems

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        batch = state.timestamp.batch
        if event == Event.FIT_START:
            self._start(state)
            return
        if self.mode == "weights" and self.snapshot is None and batch == self._to_batch:
            self._take_snapshot(state)
        if state.masks_updated_at == batch:
            self._rewind(state, logger)
        if self.retrain_from is not None:
            for group, lr in zip(state.optimizer.param_groups, self.lrs_at(batch), strict=True):
                group["lr"] = lr

    def lrs_at(self, batch: int) -> list[float]:
        """Each param group's LR at ``batch`` of the retrain that started at the pruning."""
        if self.mode == "finetune" and self.finetune_lr is not None:
            return [self.finetune_lr] * len(self._base_lrs)
        if self._schedule is None:  # a constant LR: every mode trains on at the base LR
            return list(self._base_lrs)
        if self.mode == "finetune":  # the original schedule's final value
            position = self._end
        else:
            assert self.retrain_from is not None
            position = replayed_step(batch, self.retrain_from, self._to_batch, self._end)
        factor = self._schedule.factor_at(position)
        return [base * factor for base in self._base_lrs]

    def _start(self, state: State) -> None:
        batch = state.timestamp.batch
        self._to_batch = round(state.converter.to_batches(self.to))
        self._base_lrs = (
            list(state.schedulers[0].base_lrs)
            if state.schedulers
            else [g["lr"] for g in state.optimizer.param_groups]
        )
        self._schedule = state.schedulers[0].lr_lambdas[0] if state.schedulers else None
        self._end = None
        if self._schedule is not None:
            if not hasattr(self._schedule, "factor_at"):
                raise ConfigError(
                    "algorithms.rewinding: the LR scheduler is not a schedule in Time "
                    "(speedup.optim), so its tail cannot be replayed"
                )
            if self._schedule.total is None and not (
                self.mode == "finetune" and self.finetune_lr is not None
            ):
                raise ConfigError(
                    f"algorithms.rewinding: max_duration={state.max_duration} is wall-clock, so "
                    f"the {self._schedule.name} schedule has no last step to rewind towards; "
                    "give max_duration in ep, ba, sp or tok"
                )
            self._end = self._schedule.total
        if self.mode == "finetune" and self.finetune_lr is None and self._schedule is not None:
            # the multiplier, not each group's LR: a group the user set to LR 0 is not refused
            final = self._schedule.factor_at(self._end)
            if final <= 0.0:
                raise ConfigError(
                    f"algorithms.rewinding.finetune_lr: mode finetune trains at the original "
                    f"schedule's final LR (Renda et al. 2020), and the {self._schedule.name} "
                    f"schedule ends at LR 0; set algorithms.rewinding.finetune_lr to a positive LR"
                )
        for other in state.algorithms:  # units that differ are comparable only now
            first = getattr(other, "first_prune_time", lambda: None)()
            if first is not None and state.converter.to_batches(first) < self._to_batch:
                raise ConfigError(
                    f"algorithms.rewinding: to={self.to} is later than {other.name}'s "
                    f"first pruning at {first}"
                )
        if self.mode == "weights" and self.snapshot is None and batch >= self._to_batch:
            if batch > self._to_batch:
                raise ConfigError(
                    f"algorithms.rewinding: cannot snapshot at {self.to}, training is past it"
                )
            self._take_snapshot(state)

    def _take_snapshot(self, state: State) -> None:
        self.snapshot = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def _rewind(self, state: State, logger: Logger) -> None:
        batch = state.timestamp.batch
        if self.mode == "weights":
            if self.snapshot is None:
                raise ValueError(f"rewinding: no snapshot at {self.to} before the pruning")
            rewind_weights(state.model, self.snapshot, state.masks)
            state.optimizer.state.clear()  # momentum and Adam moments restart with the weights
        self.retrain_from = batch
        logger.log_metrics({"rewinding/at_batch": batch, "rewinding/to_batch": self._to_batch})

    def state_dict(self) -> dict:
        return {"snapshot": self.snapshot, "retrain_from": self.retrain_from}

    def load_state_dict(self, state: dict) -> None:
        self.snapshot = state.get("snapshot")
        self.retrain_from = state.get("retrain_from")
