"""The built-in callbacks: an LR monitor, a speed (throughput) monitor and early stopping.

They register in :data:`speedup.callback.CALLBACKS` through the entry-point group
``speedup.callbacks`` of the project's own ``pyproject.toml``, exactly as a third-party
callback does, so recipes name them (``callbacks: {early_stopping: {monitor: accuracy,
patience: 2ep}}``) and ``speedup list callbacks`` shows them.

**Monitors** add figures to the trainer's training record. At every ``log_interval`` the
trainer logs one record: the training loss (its own), then each :class:`Monitor`'s
:meth:`Monitor.train_log`, in callback order. The :class:`Trainer` puts an
:class:`LRMonitor` and a :class:`SpeedMonitor` in front of the callbacks it is given, unless
those already hold one of that class (:func:`with_default_monitors`), so every run's
``metrics.jsonl`` carries ``lr`` and ``throughput/samples_per_s``; pass your own instance to
configure one (``SpeedMonitor(window="50ba")``).
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from speedup.callback import Callback
from speedup.event import Event
from speedup.time import Time, TimeUnit

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "EarlyStopping",
    "LRMonitor",
    "Monitor",
    "SpeedMonitor",
    "lower_is_better",
    "position",
    "with_default_monitors",
]

# Words of a metric's name (split at anything not a letter or digit) that make it a cost: whole
# words, so that "answer_accuracy" is not a word error rate nor "lossless_acc" a loss.
_LOWER_IS_BETTER = frozenset(
    {
        "loss",
        "losses",
        "error",
        "errors",
        "err",
        "perplexity",
        "ppl",
        "nll",
        "ce",
        "entropy",
        "mse",
        "mae",
        "rmse",
        "wer",
        "cer",
        "bpb",
        "bpc",
        "bits",
        "kl",
        "distance",
    }
)


def lower_is_better(metric: str) -> bool:
    """True for losses, errors, perplexities and other costs (a word of the name says so:
    ``loss``, ``top1_error``, ``perplexity``, ``cross_entropy``, ``bpb``...); False for
    accuracy and the like."""
    words = re.split(r"[^a-z0-9]+", metric.lower())
    return any(word in _LOWER_IS_BETTER for word in words)


def position(state: State, unit: TimeUnit) -> float:
    """Where training is, in ``unit`` (not ``dur``): epochs count the partial epoch (3 of 4
    batches into epoch 2 is 2.75), ``sec`` is training wall-clock (eval excluded)."""
    ts = state.timestamp
    if unit == TimeUnit.EPOCH:
        per_epoch = state.converter.batches_per_epoch if state.converter is not None else 0
        return ts.epoch + (ts.batch_in_epoch / per_epoch if per_epoch else 0.0)
    return float(ts.get(unit))


def _in_run_units(time: Time, state: State) -> Time:
    """``time`` with ``dur`` resolved against the run's max_duration (other units as given)."""
    if time.unit != TimeUnit.DURATION:
        return time
    assert state.converter is not None, "the Trainer gives the state its converter"
    return state.converter.convert(time, state.max_duration.unit)


def _time_argument(key: str, value: Time | str) -> Time:
    try:
        return Time.parse(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key}: {err}") from None


# -- monitors ---------------------------------------------------------------------------------


class Monitor(Callback):
    """A callback whose figures join the trainer's training record at every ``log_interval``.

    Override :meth:`train_log`; the trainer calls it right after the log interval's batch
    (after BATCH_END: the optimizer and scheduler have stepped, the timestamp has advanced)
    and logs what it returns in the same record as the training loss."""

    def train_log(self, state: State) -> dict[str, float]:
        """The figures for this training record, by metric name."""
        return {}


class LRMonitor(Monitor):
    """Logs the learning rate of every param group at each ``log_interval``.

    Group 0 is ``lr``, the others ``lr/group1``, ``lr/group2``... The value is the one the
    scheduler set for the next step (read after BATCH_END). On by default: the Trainer adds one
    unless its callbacks hold an LRMonitor.
    """

    def train_log(self, state: State) -> dict[str, float]:
        if state.optimizer is None:
            return {}
        groups = state.optimizer.param_groups
        return {("lr" if i == 0 else f"lr/group{i}"): g["lr"] for i, g in enumerate(groups)}


#: What a SpeedMonitor point records, in this order (its window may be in any of them).
_COLUMNS = (TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN, TimeUnit.SECOND)
_SECOND, _TOKEN = _COLUMNS.index(TimeUnit.SECOND), _COLUMNS.index(TimeUnit.TOKEN)
_RATES = (  # (metric name, column counted)
    ("samples_per_s", _COLUMNS.index(TimeUnit.SAMPLE)),
    ("batches_per_s", _COLUMNS.index(TimeUnit.BATCH)),
    ("tokens_per_s", _TOKEN),
)


class SpeedMonitor(Monitor):
    """Logs training throughput at each ``log_interval``: samples, batches and tokens per second.

    ``throughput/samples_per_s`` and ``throughput/batches_per_s`` are the run's totals so far
    over its training wall-clock (evaluation and checkpoint writes excluded; a resumed run
    counts from the start of the original one); ``throughput/tokens_per_s`` is logged where
    the batches carry tokens (``input_ids``). With ``window`` (a Time: ``"50ba"``, ``"1ep"``,
    ``"30sec"``, ``"0.1dur"``), the same figures over the last ``window`` of training are also
    logged as ``throughput/moving/samples_per_s`` and so on (over all of training until a whole
    window has passed). On by default without a window: the Trainer adds one unless its
    callbacks hold a SpeedMonitor.
    """

    def __init__(self, window: Time | str | None = None) -> None:
        self.window = None if window is None else _time_argument("window", window)
        if self.window is not None and self.window.value <= 0:
            raise ValueError(f"window must be > 0, got {window!r}")
        #: ``(epoch, batch, sample, token, train seconds)`` after each batch; the first is the
        #: last point at or before the window's start.
        self._points: deque[tuple[float, ...]] = deque()
        self._span: Time | None = None  # the window in run units, set at fit start

    def hooks(self) -> dict[Event, Callable[[State, Logger], None]]:
        # Without a window nothing is recorded per batch: the totals are in the timestamp.
        return super().hooks() if self.window is not None else {}

    def train_log(self, state: State) -> dict[str, float]:
        ts = state.timestamp
        out: dict[str, float] = {}
        if ts.train_time_s > 0:
            out["throughput/samples_per_s"] = ts.sample / ts.train_time_s
            out["throughput/batches_per_s"] = ts.batch / ts.train_time_s
            if ts.token:
                out["throughput/tokens_per_s"] = ts.token / ts.train_time_s
        if len(self._points) >= 2:
            first, last = self._points[0], self._points[-1]
            seconds = last[_SECOND] - first[_SECOND]
            if seconds > 0:
                for name, column in _RATES:
                    if column != _TOKEN or last[column]:
                        rate = (last[column] - first[column]) / seconds
                        out[f"throughput/moving/{name}"] = rate
        return out

    def _point(self, state: State) -> tuple[float, ...]:
        return tuple(position(state, unit) for unit in _COLUMNS)

    def fit_start(self, state: State, logger: Logger) -> None:
        assert self.window is not None
        self._span = _in_run_units(self.window, state)
        point = self._point(state)
        if not self._points or self._points[-1][1] != point[1]:  # fresh, or not a resume
            self._points.append(point)

    def batch_end(self, state: State, logger: Logger) -> None:
        assert self._span is not None
        point = self._point(state)
        self._points.append(point)
        column = _COLUMNS.index(self._span.unit)
        start = point[column] - self._span.value
        while len(self._points) >= 2 and self._points[1][column] <= start + 1e-9:
            self._points.popleft()

    def state_dict(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self._points]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._points = deque(tuple(float(v) for v in p) for p in state.get("points", []))


def with_default_monitors(callbacks: Sequence[Callback]) -> list[Callback]:
    """``callbacks`` with an :class:`LRMonitor` and a :class:`SpeedMonitor` in front, each
    unless ``callbacks`` already holds one of its class (the user's own configuration)."""
    defaults: list[Callback] = [
        cls() for cls in (LRMonitor, SpeedMonitor) if not any(isinstance(c, cls) for c in callbacks)
    ]
    return [*defaults, *callbacks]


# -- early stopping ---------------------------------------------------------------------------


class EarlyStopping(Callback):
    """Stops training when an eval metric has stopped improving for ``patience``.

    ``monitor`` names an eval metric (``accuracy``, ``loss``, ``perplexity``; ``eval/accuracy``
    works too). ``mode`` is ``max`` or ``min``; by default ``min`` for a cost (a word of the
    name is loss, error, perplexity, nll...) and ``max`` otherwise. A value improves on the best
    so far when it is better by more than ``min_delta``. ``patience`` is a Time (``"3ep"``,
    ``"500ba"``, ``"0.2dur"``, ``"2e6tok"``): after an evaluation that finds no improvement
    and comes at least ``patience`` after the best one (or after the start of training, if no
    value was finite yet), the run stops at the end of that batch or epoch, with the reason
    in ``state.stop_reason`` (and in the run's summary). Patience is measured in the run's own
    Time, so it is only checked at evaluations: it should span at least one ``eval_interval``.
    The best value and where it was are saved in checkpoints, so a resumed run keeps its
    patience. The final evaluation at the end of training never counts as a stop.
    """

    def __init__(
        self,
        monitor: str = "loss",
        mode: str | None = None,
        min_delta: float = 0.0,
        patience: Time | str = "3ep",
    ) -> None:
        if not isinstance(monitor, str) or not monitor.strip():
            raise ValueError(f"monitor must name an eval metric, got {monitor!r}")
        self.monitor = monitor.strip().removeprefix("eval/")
        if mode is None:
            mode = "min" if lower_is_better(self.monitor) else "max"
        if mode not in ("max", "min"):
            raise ValueError(f"mode: {mode!r} is not allowed; allowed: max, min")
        self.mode = mode
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)):
            raise ValueError(f"min_delta must be a number, got {min_delta!r}")
        if not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.min_delta = float(min_delta)
        self.patience = _time_argument("patience", patience)
        self.best: float | None = None
        #: Where the best value was, in the patience's unit (``dur`` resolved), and its step.
        self.best_at: float | None = None
        self.best_step: int | None = None
        self._patience: Time | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        if state.eval_dataloader is None:
            raise ValueError(
                f"early_stopping monitors eval/{self.monitor}, and this run has no eval data"
            )
        self._patience = _in_run_units(self.patience, state)

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def eval_end(self, state: State, logger: Logger) -> None:
        assert self._patience is not None, "fit_start resolves the patience"
        if self.monitor not in state.eval_metrics:
            known = ", ".join(sorted(state.eval_metrics)) or "(none)"
            raise ValueError(
                f"early_stopping: monitor {self.monitor!r} is not an eval metric of this run; "
                f"it reports: {known}"
            )
        value = float(state.eval_metrics[self.monitor])
        now = position(state, self._patience.unit)
        if self._improves(value):
            self.best, self.best_at, self.best_step = value, now, state.timestamp.batch
            return
        since = now - (self.best_at if self.best_at is not None else 0.0)
        if since + 1e-9 < self._patience.value or state.elapsed_fraction >= 1.0:
            return
        if self.best is None:
            found = f"no finite eval/{self.monitor} in {self.patience}"
        else:
            delta = f" by more than {self.min_delta:g}" if self.min_delta else ""
            found = (
                f"eval/{self.monitor} has not improved on {self.best:.6g} (step "
                f"{self.best_step}){delta} in {self.patience}"
            )
        state.stop_training(f"early stopping: {found}")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_at": self.best_at, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.best_at = state.get("best_at")
        self.best_step = state.get("best_step")
