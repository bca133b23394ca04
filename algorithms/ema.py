"""Exponential moving average of the weights (EMA).

**What.** Keeps a second copy of the weights and buffers that trails the trained ones,
``ema <- smoothing * ema + (1 - smoothing) * weights``, updated every ``update_interval``;
evaluation runs with the average, and the model a run leaves behind holds the average.
Averaging the iterates of stochastic gradient descent is Polyak & Juditsky (1992,
"Acceleration of stochastic approximation by averaging", SIAM J. Control Optim. 30(4)): the
running average attains the optimal asymptotic rate where the last iterate does not. Theirs is
a uniform average from the start; the exponential form forgets early, poor iterates and is the
one deep-learning trainers use (Composer's EMA was inspired by TensorFlow's).
The decay is a half-life in Time: after ``half_life`` the weight of an old value has halved,
so ``smoothing = 0.5 ** (update_interval / half_life)`` with both converted to batches at fit
start (``half_life`` may be in ``ba``, ``ep``, ``sp``, ``tok`` or ``dur``, independent of the
interval's unit: Composer needed the two in one unit).

**When it helps.** Noisy late training, high learning rates, short schedules. Composer's
method card (composer/algorithms/ema/README.md) reports smoother, less noisy validation
metrics and "sometimes increased generalization", gives no isolated speedup figure, and
suggests ``half_life="50ba"`` updated every batch as a starting point; all three of its
ResNet-50 ImageNet recipes (mild, medium, spicy: composer/yamls/recipes/resnet50_*.yaml) use
``half_life: 100ba, update_interval: 20ba``, i.e. smoothing ``0.5 ** 0.2 = 0.871`` per update.
Expected effect: eval curves with less step-to-step noise and, on short high-LR runs, a small
gain in final accuracy; little change where the learning rate anneals to zero, since the last
iterates then barely move.

**Cost.** One extra copy of the weights and buffers (activations and optimizer state are not
duplicated), one fused ``lerp`` per update, and at each evaluation an in-place exchange of
values between the model and the copy: no new module and no persistent memory, and since the
model's tensors keep their storage, optimizer state, masks, DDP/FSDP shards and CUDA graphs
that hold them stay valid (swapping ``.data`` pointers would be cheaper but breaks those).

**The trained model is the average.** At FIT_END the model is left holding the EMA weights:
the model you save or export after ``fit()`` is the averaged one. FIT_END's contract says
algorithms must not change training state there; this swap is the one declared exception
(Composer likewise puts the EMA weights into the model it checkpoints). The training weights
stay in this algorithm (``state_dict()["weights"]`` with ``model_holds_ema: True``); a later
``fit()``, or a resume from a checkpoint written after fit, swaps them back at FIT_START.
With ``eval_with_ema=False`` the average is only tracked (``EMA.ema``) and never swapped in.

**Composes badly with.** SWA (both average the weights and both want to be the evaluated
model: declared incompatible). Pruning, unless the average respects the masks: handled here,
masked entries of the average are kept at exactly zero (it reads ``masks``), and after a
weight rewind (``rewinding`` with ``mode: weights``) the average restarts from the rewound
weights, since averaging across the rewind would mix two different trainings. Model surgery
after fit start (the copy is built from the model's tensors then).

Functional twin: :func:`compute_ema`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from speedup.algorithms._held import check_names, cpu_copies, exchange, from_saved, pair
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.time import Time, schedule_time

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["EMA", "compute_ema", "smoothing_from_half_life"]

#: Half-life used when neither ``half_life`` nor ``smoothing`` is given (Composer's default).
DEFAULT_HALF_LIFE = "1000ba"

Tensors = Mapping[str, torch.Tensor]


def _named_tensors(source: nn.Module | Tensors) -> dict[str, torch.Tensor]:
    """Parameters and buffers by state-dict name (a mapping passes through)."""
    if isinstance(source, nn.Module):
        return {**dict(source.named_parameters()), **dict(source.named_buffers())}
    return dict(source)


def smoothing_from_half_life(half_life: float, update_interval: float = 1.0) -> float:
    """Per-update smoothing for a half-life and update period in the same unit (batches)."""
    if half_life <= 0 or update_interval <= 0:
        raise ValueError("half_life and update_interval must be > 0")
    return 0.5 ** (update_interval / half_life)


@torch.no_grad()
def compute_ema(ema: nn.Module | Tensors, model: nn.Module | Tensors, smoothing: float) -> None:
    """Move ``ema`` towards ``model`` in place: ``ema = smoothing * ema + (1 - smoothing) *
    model`` for every floating parameter and buffer, in one fused ``lerp``; integer buffers
    (BatchNorm's ``num_batches_tracked``) are copied.

    ``ema`` and ``model`` are modules or ``{name: tensor}`` mappings with the same names
    (``ema`` may be ``copy.deepcopy(model)`` or ``{k: v.clone() for k, v in
    model.state_dict().items()}``). ``smoothing`` 0 copies, 1 leaves ``ema`` unchanged.
    """
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    averages, current = _named_tensors(ema), _named_tensors(model)
    check_names(averages, current, "ema and model differ")
    floats = [n for n, t in averages.items() if t.is_floating_point()]
    _lerp([averages[n] for n in floats], [current[n] for n in floats], 1.0 - smoothing)
    for name, tensor in averages.items():
        if not tensor.is_floating_point():
            tensor.copy_(current[name])


@torch.no_grad()
def _lerp(averages: list[torch.Tensor], current: list[torch.Tensor], weight: float) -> None:
    if averages:
        torch._foreach_lerp_(averages, current, weight)


class EMA(Algorithm):
    """Average the weights exponentially; evaluate with, and finish on, the average.

    ``half_life`` (a Time; ``1000ba`` when neither it nor ``smoothing`` is given) or
    ``smoothing`` (per update, in (0, 1)) set the decay; ``update_interval`` is the period of
    updates and ``ema_start`` when averaging begins (the average starts as a copy of the
    weights then; evaluations before it use the training weights).
    """

    name = "ema"
    # Half-lives as fractions of the run: Composer's recipes use about 0.1-2% of the run.
    SEARCH_SPACE = {
        "half_life": {"type": "float", "low": 0.001, "high": 0.05, "log": True, "unit": "dur"}
    }

    def __init__(
        self,
        half_life: str | None = None,
        smoothing: float | None = None,
        update_interval: str = "1ba",
        ema_start: str = "0.0dur",
        eval_with_ema: bool = True,
    ) -> None:
        if half_life is not None and smoothing is not None:
            raise ValueError(
                f"ema: give half_life or smoothing, not both (got half_life={half_life!r}, "
                f"smoothing={smoothing})"
            )
        if smoothing is not None and not 0.0 < smoothing < 1.0:
            raise ValueError(f"ema.smoothing must be in (0, 1), got {smoothing}")
        if smoothing is None and half_life is None:
            half_life = DEFAULT_HALF_LIFE
        self.half_life = (
            schedule_time("ema.half_life", half_life, positive=True)
            if half_life is not None
            else None
        )
        self.smoothing = smoothing
        self.update_interval = schedule_time("ema.update_interval", update_interval, positive=True)
        self.ema_start = schedule_time("ema.ema_start", ema_start)
        self.eval_with_ema = eval_with_ema
        #: The copy this algorithm holds, by parameter/buffer name: the average during
        #: training; the training weights while ``model_holds_ema`` (after fit).
        self.ema: dict[str, torch.Tensor] | None = None
        self.model_holds_ema = False
        self.anchor: int | None = None  # batch the update schedule counts from
        #: Per-update smoothing and update period in batches, resolved at FIT_START.
        self.resolved_smoothing: float | None = None
        self.interval_batches = 1
        self._start_batch = 0.0
        self._reset_on_mask_change = False
        self._eval_swapped = False
        self._held: list[torch.Tensor] = []  # self.ema's tensors, in model order
        self._live: list[torch.Tensor] = []  # the model's parameters and buffers
        self._floats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # (held, live)
        self._others: list[tuple[torch.Tensor, torch.Tensor]] = []  # integer buffers
        self._mask_source: dict | None = None
        self._masked: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def time_constants(self) -> dict[str, Time]:
        # Longer than the run, the average ends mostly the initial weights (or never starts).
        found = {"ema_start": self.ema_start}
        return {"half_life": self.half_life, **found} if self.half_life is not None else found

    def declare(self) -> Declaration:
        swaps = Access(reads={"model.weights"}, writes={"model.weights"})
        events = {
            # Writes only when the model still holds the average from an earlier fit.
            Event.FIT_START: Access(
                reads={"model.weights", "masks", "timestamp"},
                writes={"model.weights"} if self.eval_with_ema else (),
            ),
            # The average is this algorithm's own copy: nothing in the model is written.
            Event.BATCH_END: Access(reads={"model.weights", "masks", "timestamp"}),
        }
        if self.eval_with_ema:
            events.update({Event.EVAL_START: swaps, Event.EVAL_END: swaps, Event.FIT_END: swaps})
        return Declaration(
            events=events,
            # See the pruned, rewound weights of this batch, never the ones before.
            runs_after={"magnitude_pruning", "rewinding"},
            incompatible_with={"swa"},
        )

    # -- events -------------------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        if event == Event.EVAL_END:
            return self._eval_swapped
        if event in (Event.EVAL_START, Event.FIT_END):  # bound: started in this fit
            return bool(self._held) and not self.model_holds_ema
        return True

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state, logger)
        elif event == Event.BATCH_END:
            self._batch_end(state)
        elif event == Event.EVAL_START:
            exchange(self._live, self._held)
            self._eval_swapped = True
        elif event == Event.EVAL_END:
            exchange(self._live, self._held)
            self._eval_swapped = False
        elif event == Event.FIT_END:
            exchange(self._live, self._held)
            self.model_holds_ema = True

    def _fit_start(self, state: State, logger: Logger) -> None:
        times = {}
        for key in ("half_life", "update_interval", "ema_start"):
            time = getattr(self, key)
            try:
                times[key] = state.converter.to_batches(time) if time is not None else None
            except ValueError as err:
                raise ConfigError(f"algorithms.ema.{key}: {time}: {err}") from None
        self.interval_batches = max(1, round(times["update_interval"]))
        self._start_batch = times["ema_start"]
        if self.smoothing is not None:
            self.resolved_smoothing = self.smoothing
        else:
            half_life = times["half_life"]
            self.resolved_smoothing = smoothing_from_half_life(half_life, self.interval_batches)
        self._reset_on_mask_change = any(
            other.name == "rewinding" and getattr(other, "mode", None) == "weights"
            for other in state.algorithms
        )
        self._mask_source = None
        if self.ema is None:  # a resumed run logged this already
            logger.log_metrics({"ema/smoothing": self.resolved_smoothing})
        if self.ema is not None:  # resumed, or a second fit
            self._bind(state.model)
            self.anchor = 0 if self.anchor is None else self.anchor
            if self.model_holds_ema:  # train on from the training weights
                exchange(self._live, self._held)
                self.model_holds_ema = False
        elif state.timestamp.batch >= self._start_batch:
            self._restart(state)

    @torch.no_grad()
    def _batch_end(self, state: State) -> None:
        batch = state.timestamp.batch
        if self.ema is None:
            if batch >= self._start_batch:
                self._restart(state)
            return
        if self._reset_on_mask_change and state.masks_updated_at == batch:
            self._restart(state)  # the weights were rewound: average from them afresh
            return
        updated = (batch - self.anchor) % self.interval_batches == 0
        if updated:
            _lerp(*self._floats, 1.0 - self.resolved_smoothing)
            for held, live in self._others:
                held.copy_(live)
        if updated or state.masks is not self._mask_source:  # new masks apply at once
            self._mask(state)

    # -- the copy -----------------------------------------------------------------------------

    @torch.no_grad()
    def _restart(self, state: State) -> None:
        """(Re)start the average as a copy of the current weights."""
        self.ema = {n: t.detach().clone() for n, t in _named_tensors(state.model).items()}
        if self.anchor is None:
            self.anchor = state.timestamp.batch
        self.model_holds_ema = False
        self._bind(state.model)
        self._mask(state)

    def _bind(self, model: nn.Module) -> None:
        """Pair the held tensors with the model's, on the model's device and dtype."""
        assert self.ema is not None
        self._held, self._live = pair(
            self.ema, _named_tensors(model), "ema: the saved average does not match the model"
        )
        pairs = list(zip(self._held, self._live))
        floats = [(h, t) for h, t in pairs if t.is_floating_point()]
        self._floats = ([h for h, _ in floats], [t for _, t in floats])
        self._others = [(h, t) for h, t in pairs if not t.is_floating_point()]
        self._mask_source = None

    @torch.no_grad()
    def _mask(self, state: State) -> None:
        """Zero the average where the pruning masks are False."""
        masks = state.masks
        if not masks:
            return
        if masks is not self._mask_source:  # pruning installs a new dict when masks change
            assert self.ema is not None
            unknown = sorted(set(masks) - set(self.ema))
            if unknown:
                raise ValueError(f"ema: masks name tensors the model does not have: {unknown}")
            held = [self.ema[n] for n in masks]
            floats = [m.to(device=t.device, dtype=t.dtype) for m, t in zip(masks.values(), held)]
            self._masked = (held, floats)
            self._mask_source = masks
        if self._masked[0]:
            torch._foreach_mul_(*self._masked)

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "weights": cpu_copies(self.ema),
            "model_holds_ema": self.model_holds_ema,
            "anchor": self.anchor,
        }

    def load_state_dict(self, state: dict) -> None:
        self.ema = from_saved(state.get("weights"))
        self.model_holds_ema = bool(state.get("model_holds_ema", False))
        self.anchor = state.get("anchor")
        self._live, self._held = [], []
        self._eval_swapped = False
