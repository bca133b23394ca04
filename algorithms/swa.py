"""Stochastic weight averaging (SWA).

**What.** Averages the weights visited late in training with equal weights,
``w_SWA <- (n * w_SWA + w) / (n + 1)``, sampled every ``update_interval`` from ``swa_start``,
and ends the run on the average (Izmailov et al. 2018, "Averaging weights leads to wider
optima and better generalization", UAI, algorithm 1). SGD with a constant or cyclical
learning rate circles a wide, flat basin; the average of its iterates lies nearer the basin's
centre than any single iterate, where test error is lower. Optionally the learning rate is
annealed from its value at ``swa_start`` to a constant ``swa_lr`` over ``anneal_steps``
(``cos`` or ``linear``, as ``torch.optim.swa_utils.SWALR`` does), written into the
optimizer's param groups before every step and overriding the run's scheduler from then on;
``swa_lr=None`` (default) keeps the run's own schedule. At the end of training (the batch
that reaches ``max_duration``) the average is copied into the model and BatchNorm running
statistics, which an average of weights does not define, are recomputed by a forward pass in
train mode over ``bn_batches`` batches of the training data (``None``: one full pass, the
paper's choice), with cumulative (equal-weight) statistics. The final evaluation and any
checkpoint written after it see the averaged model; evaluations before the end see the
training weights. Only floating parameters are averaged; other buffers keep their live values.

**When it helps.** Image classification at a fixed epoch budget. Izmailov et al. (table 1)
report lower CIFAR-100 test error than conventional SGD at the same budget for VGG-16,
PreResNet-164 and WideResNet-28-10 (gains of about 1-2 points), and on ImageNet (table 2)
0.6-0.8 points top-1 from 10 epochs of SWA started from pretrained torchvision models.
Defaults: ``swa_start=0.7dur`` and one average per epoch as in Composer (whose SWA stops
averaging at 0.97 of the run to leave epochs for BatchNorm statistics; here they are
recomputed explicitly, so averaging runs to the end), and ``anneal_steps`` 10 epochs, cosine,
as ``torch.optim.swa_utils.SWALR``. Composer's method card gives no quantitative effect.
Cost: one copy of the parameters, one fused update per interval, and the BatchNorm pass at
the end (one epoch of forward passes by default; counted as training time).

**Composes badly with.** EMA (both average the weights and both want to be the final model:
declared incompatible both ways). Pruning: handled, the average is masked with
``state.masks`` at every update, so pruned weights stay exactly zero. LR schedules: with
``swa_lr`` set, SWA owns the learning rate from ``swa_start`` on. A run stopped early
(``stop_training``) ends on its training weights: averaging finishes only at
``max_duration``.

Functional twins: :func:`average_weights`, :func:`update_bn`, :func:`swa_lr_factor`.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from speedup.algorithms._held import cpu_copies, from_saved
from torch import nn

from speedup import distributed
from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.time import Time, TimeUnit, schedule_time

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["ANNEAL_STRATEGIES", "SWA", "average_weights", "swa_lr_factor", "update_bn"]

ANNEAL_STRATEGIES = ("cos", "linear")


def _parameters(source: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return {n: p for n, p in source.named_parameters() if p.is_floating_point()}
    return dict(source)


@torch.no_grad()
def average_weights(
    average: dict[str, torch.Tensor],
    model: nn.Module | Mapping[str, torch.Tensor],
    num_averaged: int,
) -> int:
    """Fold ``model``'s floating parameters into the equal-weight running ``average`` in place,
    ``average <- average + (w - average) / (num_averaged + 1)``, and return the new count.

    ``average`` is ``{name: tensor}``; with ``num_averaged`` 0 it may be empty, and is filled
    with copies of the weights (what ``torch.optim.swa_utils.AveragedModel`` does first).
    """
    current = _parameters(model)
    if num_averaged == 0:
        average.clear()
        average.update({n: t.detach().clone() for n, t in current.items()})
        return 1
    if average.keys() != current.keys():
        missing = sorted(current.keys() - average.keys())
        extra = sorted(average.keys() - current.keys())
        raise ValueError(f"average and model differ: missing {missing}, unexpected {extra}")
    names = list(current)
    torch._foreach_lerp_(
        [average[n] for n in names], [current[n].detach() for n in names], 1.0 / (num_averaged + 1)
    )
    return num_averaged + 1


def swa_lr_factor(progress: float, strategy: str = "cos") -> float:
    """How far the LR has moved from its start value towards ``swa_lr``, in [0, 1], at
    ``progress`` (fraction of the annealing phase done)."""
    t = min(1.0, max(0.0, progress))
    if strategy == "cos":
        return (1.0 - math.cos(math.pi * t)) / 2.0
    if strategy == "linear":
        return t
    raise ValueError(f"strategy must be one of {', '.join(ANNEAL_STRATEGIES)}, got {strategy!r}")


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Mapping):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch.to(device) if torch.is_tensor(batch) else batch


@contextlib.contextmanager
def _rng_preserved(device: torch.device | None) -> Iterator[None]:
    """Leave torch's and python's RNGs as they were (loader transforms may draw from them)."""
    devices = [device] if device is not None and device.type == "cuda" else []
    state = random.getstate()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(state)


@torch.no_grad()
def update_bn(
    model: nn.Module,
    batches: Iterable[Any],
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Recompute BatchNorm running statistics as the equal-weight average over ``batches``.

    Each batch goes to ``model`` in train mode: a dict as it is (a :class:`~speedup.models.Model`
    takes the batch dict), a tuple or list by its first element (``(inputs, targets)``), a
    tensor as it is. Statistics are reset first and accumulated cumulatively (``momentum``
    None), then each norm's momentum and the model's mode are restored. Stops after
    ``max_batches`` (None: all). Returns the number of batches used (0 without BatchNorm).
    """
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return 0
    device = torch.device(device) if isinstance(device, str) else device
    momenta = [m.momentum for m in norms]
    training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    used = 0
    try:
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            batch = _to_device(batch, device)
            if isinstance(batch, (list, tuple)):
                batch = batch[0]
            model(batch)
            used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(training)
    return used


class SWA(Algorithm):
    """Average the weights with equal weights late in training; end on the average."""

    name = "swa"
    # Izmailov et al. 2018 start averaging at about 75% of the budget.
    SEARCH_SPACE = {"swa_start": {"type": "float", "low": 0.5, "high": 0.9, "unit": "dur"}}

    def __init__(
        self,
        swa_start: str = "0.7dur",
        update_interval: str = "1ep",
        swa_lr: float | None = None,
        anneal_steps: str = "10ep",
        anneal_strategy: str = "cos",
        bn_batches: int | None = None,
    ) -> None:
        self.swa_start = schedule_time("swa.swa_start", swa_start)
        if self.swa_start.unit == TimeUnit.DURATION and self.swa_start.value >= 1:
            raise ValueError(f"swa.swa_start must be before the end (< 1dur), got {swa_start!r}")
        self.update_interval = schedule_time("swa.update_interval", update_interval, positive=True)
        if swa_lr is not None and not swa_lr >= 0:
            raise ValueError(f"swa.swa_lr must be >= 0 (or None), got {swa_lr}")
        self.anneal_steps = schedule_time("swa.anneal_steps", anneal_steps)
        if anneal_strategy not in ANNEAL_STRATEGIES:
            raise ValueError(
                f"swa.anneal_strategy must be one of {', '.join(ANNEAL_STRATEGIES)}, "
                f"got {anneal_strategy!r}"
            )
        if bn_batches is not None and (isinstance(bn_batches, bool) or bn_batches < 1):
            raise ValueError(
                f"swa.bn_batches must be >= 1 (or None: a full pass), got {bn_batches}"
            )
        self.swa_lr = swa_lr
        self.anneal_strategy = anneal_strategy
        self.bn_batches = bn_batches
        #: The running average by parameter name (None until the first update).
        self.average: dict[str, torch.Tensor] | None = None
        self.num_averaged = 0
        #: Each param group's LR when the SWA phase began (the annealing starts from it).
        self.anneal_from: list[float] | None = None
        #: True once the average has been put into the model (at the end of training).
        self.finished = False
        self._start = 0  # first update, in batches
        self._interval = 1
        self._anneal = 0.0

    def time_constants(self) -> dict[str, Time]:
        return {"swa_start": self.swa_start}  # after the end: nothing would be averaged

    def declare(self) -> Declaration:
        events = {
            Event.FIT_START: Access(reads={"model.weights", "timestamp", "max_duration"}),
            # Updates its own copy; at the last batch writes the average into the model and
            # recomputes BatchNorm statistics over the train dataloader.
            Event.BATCH_END: Access(
                reads={"model.weights", "masks", "timestamp", "max_duration", "dataloader"},
                writes={"model.weights"},
            ),
        }
        if self.swa_lr is not None:
            events[Event.BEFORE_TRAIN_BATCH] = Access(reads={"timestamp", "lr"}, writes={"lr"})
        return Declaration(
            events=events,
            runs_after={"magnitude_pruning", "rewinding"},  # average the pruned, rewound weights
            incompatible_with={"ema"},
        )

    # -- schedule -----------------------------------------------------------------------------

    def _due(self, batch: int) -> bool:
        return batch >= self._start and (batch - self._start) % self._interval == 0

    def lr_at(self, batch: int, start_lr: float) -> float:
        """The SWA learning rate for the step after ``batch`` steps, from ``start_lr``."""
        assert self.swa_lr is not None
        if self._anneal <= 0:
            return self.swa_lr
        alpha = swa_lr_factor((batch - self._start) / self._anneal, self.anneal_strategy)
        return self.swa_lr * alpha + start_lr * (1.0 - alpha)

    # -- events -------------------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        if event == Event.BEFORE_TRAIN_BATCH:
            return not self.finished and state.timestamp.batch >= self._start
        if event == Event.BATCH_END:
            return not self.finished
        return True

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state)
        elif event == Event.BEFORE_TRAIN_BATCH:
            groups = state.optimizer.param_groups
            if self.anneal_from is None:
                self.anneal_from = [float(g["lr"]) for g in groups]
            for group, start_lr in zip(groups, self.anneal_from):
                group["lr"] = self.lr_at(state.timestamp.batch, start_lr)
        else:
            batch = state.timestamp.batch
            if self._due(batch):
                self._update(state)
            if self._at_end(state):
                self._finish(state, logger)

    def _at_end(self, state: State) -> bool:
        """Whether this BATCH_END is the run's last (the trainer's own test; the epoch counter
        only advances after the last BATCH_END of an epoch, so epochs are counted in batches)."""
        ts, end = state.timestamp, state.max_duration
        if end.unit == TimeUnit.EPOCH:
            return ts.batch >= end.value * state.converter.batches_per_epoch
        return ts.get(end.unit) >= end.value

    def _fit_start(self, state: State) -> None:
        conv = state.converter
        try:
            start = conv.to_batches(self.swa_start)
            interval = conv.to_batches(self.update_interval)
            anneal = conv.to_batches(self.anneal_steps)
        except ValueError as err:
            raise ConfigError(f"algorithms.swa: {err}") from None
        self._start = math.ceil(start - 1e-9)
        self._interval = max(1, round(interval))
        self._anneal = anneal
        total = conv.to_batches(state.max_duration)
        if self._start > total:
            raise ConfigError(
                f"algorithms.swa.swa_start: {self.swa_start} is after the end of training "
                f"({state.max_duration}); nothing would be averaged"
            )
        if self.average is not None:  # resumed: the held average follows the model's device
            params = _parameters(state.model)
            self.average = {
                n: t.to(device=params[n].device, dtype=params[n].dtype)
                for n, t in self.average.items()
            }
        elif self._due(state.timestamp.batch) and state.timestamp.batch == 0:
            self._update(state)  # swa_start 0: the initial weights are the first sample

    def _update(self, state: State) -> None:
        if self.average is None:
            self.average = {}
        self.num_averaged = average_weights(self.average, state.model, self.num_averaged)
        if state.masks:  # pruned weights stay exactly zero in the average
            with torch.no_grad():
                for name, mask in state.masks.items():
                    if name in self.average:
                        self.average[name].mul_(mask.to(self.average[name].dtype))

    def _finish(self, state: State, logger: Logger) -> None:
        self.finished = True
        logger.log_metrics({"swa/num_averaged": self.num_averaged})
        if self.average is None:
            return
        model = state.model
        with torch.no_grad():
            for name, p in _parameters(model).items():
                p.copy_(self.average[name])
        with _rng_preserved(state.device):
            used = update_bn(model, state.train_dataloader, self.bn_batches, state.device)
        # Each process saw its share of the data: average, so that all hold the same model.
        distributed.average_buffers(
            b
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var)
            if b is not None
        )
        logger.log_metrics({"swa/bn_batches": used})

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "average": cpu_copies(self.average),
            "num_averaged": self.num_averaged,
            "anneal_from": list(self.anneal_from) if self.anneal_from is not None else None,
            "finished": self.finished,
        }

    def load_state_dict(self, state: dict) -> None:
        self.average = from_saved(state.get("average"))
        self.num_averaged = int(state.get("num_averaged", 0))
        anneal_from = state.get("anneal_from")
        self.anneal_from = [float(x) for x in anneal_from] if anneal_from is not None else None
        self.finished = bool(state.get("finished", False))
