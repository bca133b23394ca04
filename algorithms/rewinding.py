"""Rewinding after pruning: weight rewinding, learning-rate rewinding, or fine-tuning.

**What.** When a pruning algorithm changes the masks, decide how the pruned network retrains:

* ``weights``: reset the surviving weights (and buffers) to a snapshot taken at ``to`` and
  replay the LR schedule from that point; ``to: 0ba`` is the initialisation, as in the lottery
  ticket hypothesis (Frankle & Carbin, ICLR 2019); a point early in training (``to: 500ba``)
  is "rewinding to iteration k", which finds tickets in deeper nets (Frankle et al., ICML 2020,
  "Linear mode connectivity and the lottery ticket hypothesis"). Optimizer state is cleared,
  as if training restarted there.
* ``lr``: keep the trained weights, replay the LR schedule from ``to`` (Renda et al., ICLR
  2020, "Comparing rewinding and fine-tuning in neural network pruning": LR rewinding matches
  or beats weight rewinding and beats fine-tuning at equal retraining budgets).
* ``finetune``: keep the weights and train on at a small constant LR, by default the schedule's
  final LR (the control in Renda et al. 2020; Han et al. 2015).

Surviving weights equal the snapshot bit for bit after a weight rewind; pruned ones are zero.
The snapshot lives in this algorithm's ``state_dict``.

**When it helps.** Sparse retraining: with a fixed budget, LR rewinding is the strongest
default; weight rewinding is the scientific tool (lottery tickets).

**Composes badly with.** Anything that holds its own copy of the weights (EMA/SWA) unless it
also resets at the rewind; schedules that are not functions of time.

Functional twin: :func:`rewind_weights`.
"""

from __future__ import annotations

import torch

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.config import ConfigError
from speedup.event import Event
from speedup.time import Time

__all__ = ["Rewinding", "rewind_weights"]

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


class Rewinding(Algorithm):
    """How pruned networks retrain: rewind weights, rewind the LR schedule, or fine-tune."""

    name = "rewinding"

    def __init__(
        self, mode: str = "weights", to: str = "0ba", finetune_lr: float | None = None
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"rewinding.mode must be one of {', '.join(MODES)}, got {mode!r}")
        if finetune_lr is not None and finetune_lr <= 0:
            raise ValueError(f"rewinding.finetune_lr must be > 0, got {finetune_lr}")
        self.mode = mode
        self.to = Time.parse(to)
        self.finetune_lr = finetune_lr
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.offset: int | None = None  # replay: LR at batch b is the schedule's at b - offset
        self.finetuning = False
        self._to_batch = 0
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

    def check_composition(self, algorithms) -> list[str]:  # noqa: ANN001
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

    def apply(self, event: Event, state, logger) -> None:  # noqa: ANN001
        batch = state.timestamp.batch
        if event == Event.FIT_START:
            self._to_batch = round(state.converter.to_batches(self.to))
            self._base_lrs = (
                list(state.schedulers[0].base_lrs)
                if state.schedulers
                else [g["lr"] for g in state.optimizer.param_groups]
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
            return
        if self.mode == "weights" and self.snapshot is None and batch == self._to_batch:
            self._take_snapshot(state)
        if state.masks_updated_at == batch:
            self._rewind(state, logger)
        if self.offset is not None:
            factor = self._schedule_factor(state, batch - self.offset)
            for group, base in zip(state.optimizer.param_groups, self._base_lrs, strict=True):
                group["lr"] = base * factor
        elif self.finetuning:
            end = state.converter.to_batches(state.max_duration)
            final = self._schedule_factor(state, round(end))
            for group, base in zip(state.optimizer.param_groups, self._base_lrs, strict=True):
                group["lr"] = self.finetune_lr if self.finetune_lr is not None else base * final

    def _take_snapshot(self, state) -> None:  # noqa: ANN001
        self.snapshot = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def _schedule_factor(self, state, batch: int) -> float:  # noqa: ANN001
        if not state.schedulers:
            return 1.0
        return state.schedulers[0].lr_lambdas[0].factor_at(batch)

    def _rewind(self, state, logger) -> None:  # noqa: ANN001
        batch = state.timestamp.batch
        if self.mode == "weights":
            if self.snapshot is None:
                raise ValueError(f"rewinding: no snapshot at {self.to} before the pruning")
            rewind_weights(state.model, self.snapshot, state.masks)
            state.optimizer.state.clear()  # momentum and Adam moments restart with the weights
        if self.mode in ("weights", "lr"):
            self.offset = batch - self._to_batch
        else:
            self.finetuning = True
        logger.log_metrics({"rewinding/at_batch": batch, "rewinding/to_batch": self._to_batch})

    def state_dict(self) -> dict:
        return {
            "snapshot": self.snapshot,
            "offset": self.offset,
            "finetuning": self.finetuning,
        }

    def load_state_dict(self, state: dict) -> None:
        self.snapshot = state.get("snapshot")
        self.offset = state.get("offset")
        self.finetuning = bool(state.get("finetuning", False))
