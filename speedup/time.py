"""Time: every schedule in speedup is written in these units.

``Time(90, "ep")``, ``Time.parse("500ba")``, ``"0.3dur"``, ``"2e9tok"``. Units:

========  ===========================================================
``ep``    epochs
``ba``    batches (optimizer steps)
``sp``    samples
``tok``   tokens (language models: samples x sequence length)
``dur``   a fraction of the run's ``max_duration`` (``1dur`` = the whole run)
``sec``   seconds of *training* wall-clock (evaluation excluded)
========  ===========================================================

A :class:`TimeConverter`, built from the dataloader length and batch size, converts
between units; a :class:`Timestamp` counts all of them as training proceeds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

__all__ = ["Interval", "TimeUnit", "Time", "schedule_time", "TimeConverter", "Timestamp"]


class TimeUnit(str, Enum):
    EPOCH = "ep"
    BATCH = "ba"
    SAMPLE = "sp"
    TOKEN = "tok"
    DURATION = "dur"
    SECOND = "sec"


_UNITS = ", ".join(u.value for u in TimeUnit)
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-z]+)\s*$")
_INTEGRAL = {TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN}


@dataclass(frozen=True, order=False)
class Time:
    """A non-negative amount of training time in one unit."""

    value: float
    unit: TimeUnit

    def __post_init__(self) -> None:
        object.__setattr__(self, "unit", TimeUnit(self.unit))
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool):
            raise TypeError(f"Time value must be a number, got {self.value!r}")
        if math.isnan(self.value) or self.value < 0:
            raise ValueError(f"Time must be non-negative, got {self.value}{self.unit.value}")
        if self.unit in _INTEGRAL and float(self.value).is_integer():
            object.__setattr__(self, "value", int(self.value))

    @classmethod
    def parse(cls, text: str | Time, units: Iterable[TimeUnit | str] | None = None) -> Time:
        """Parse ``"90ep"``, ``"500ba"``, ``"0.3dur"``, ``"2e9tok"``; a Time passes through.

        ``units`` restricts the units accepted where some make no sense (``max_duration``
        cannot be in ``dur``, the fraction of itself); errors then list only those."""
        allowed = list(TimeUnit) if units is None else [TimeUnit(u) for u in units]
        listed = ", ".join(u.value for u in allowed)
        if isinstance(text, Time):
            if text.unit not in allowed:
                raise ValueError(f"{text}: cannot be in {text.unit.value}; units: {listed}")
            return text
        if not isinstance(text, str):
            raise TypeError(f"expected a duration string such as '10ep', got {text!r}")
        if text.strip().startswith("-"):
            raise ValueError(f"duration {text!r} is negative; durations are >= 0")
        match = _PATTERN.match(text)
        if not match:
            examples = [
                e
                for e in ("10ep", "500ba", "0.25dur")
                if TimeUnit(e.lstrip("0123456789.")) in allowed
            ]
            shown = ", ".join(repr(e) for e in examples)
            raise ValueError(
                f"malformed duration {text!r}: expected <number><unit>"
                f"{', e.g. ' + shown if shown else ''}; units: {listed}"
            )
        number, unit = match.groups()
        if unit not in {u.value for u in TimeUnit}:
            raise ValueError(f"unknown time unit {unit!r} in {text!r}; units: {listed}")
        if TimeUnit(unit) not in allowed:
            raise ValueError(f"{text!r}: cannot be in {unit}; units: {listed}")
        value = float(number)
        if TimeUnit(unit) in _INTEGRAL and not value.is_integer():
            raise ValueError(f"{text!r}: {unit} must be a whole number")
        return cls(value, TimeUnit(unit))

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit.value}"

    def _same_unit(self, other: object) -> Time:
        if not isinstance(other, Time):
            return NotImplemented  # type: ignore[return-value]
        if other.unit != self.unit:
            raise ValueError(f"cannot combine {self} and {other}: convert to one unit first")
        return other

    def __add__(self, other: Time) -> Time:
        other = self._same_unit(other)
        return Time(self.value + other.value, self.unit)

    def __sub__(self, other: Time) -> Time:
        other = self._same_unit(other)
        return Time(self.value - other.value, self.unit)

    def __mul__(self, factor: float) -> Time:
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return Time(self.value * factor, self.unit)

    __rmul__ = __mul__

    def __lt__(self, other: Time) -> bool:
        return self.value < self._same_unit(other).value

    def __le__(self, other: Time) -> bool:
        return self.value <= self._same_unit(other).value

    def __gt__(self, other: Time) -> bool:
        return self.value > self._same_unit(other).value

    def __ge__(self, other: Time) -> bool:
        return self.value >= self._same_unit(other).value


def schedule_time(key: str, text: str | Time, *, positive: bool = False) -> Time:
    """``text`` parsed for the algorithm argument ``key`` (e.g. ``"ema.half_life"``): a point or
    interval of an algorithm's schedule, in ``ba``, ``ep``, ``sp``, ``tok`` or ``dur``.

    Wall-clock (``sec``) is refused: a schedule tied to machine speed would not replay the same
    on resume or on other hardware. ``positive`` also refuses zero (intervals, half-lives).
    Every error names ``key``.
    """
    try:
        time = Time.parse(text)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key}: {err}") from None
    if time.unit == TimeUnit.SECOND:
        raise ValueError(f"{key}: {text!r} is wall-clock; use ba, ep, sp, tok or dur")
    if positive and time.value == 0:
        raise ValueError(f"{key} must be > 0, got {text!r}")
    return time


@dataclass(frozen=True)
class TimeConverter:
    """Converts Times between units for one run.

    ``batches_per_epoch`` is the train dataloader's length, ``samples_per_batch`` the global
    batch size; ``tokens_per_sample`` is the sequence length for language models (None where
    tokens are not counted); ``max_duration`` resolves ``dur``.
    """

    batches_per_epoch: int
    samples_per_batch: int
    tokens_per_sample: int | None = None
    max_duration: Time | None = None

    def _per_batch(self, unit: TimeUnit) -> float:
        if unit == TimeUnit.BATCH:
            return 1.0
        if unit == TimeUnit.EPOCH:
            return 1.0 / self.batches_per_epoch
        if unit == TimeUnit.SAMPLE:
            return float(self.samples_per_batch)
        if unit == TimeUnit.TOKEN:
            if not self.tokens_per_sample:
                raise ValueError("tokens are not counted for this data (not a sequence dataset)")
            return float(self.samples_per_batch * self.tokens_per_sample)
        raise ValueError(f"{unit.value} has no fixed rate per batch")

    def _resolve_duration(self, time: Time) -> Time:
        if time.unit != TimeUnit.DURATION:
            return time
        if self.max_duration is None:
            raise ValueError(f"{time} needs max_duration to resolve")
        if self.max_duration.unit == TimeUnit.DURATION:
            raise ValueError("max_duration cannot itself be in dur")
        return Time(time.value * self.max_duration.value, self.max_duration.unit)

    def convert(self, time: Time | str, unit: TimeUnit | str) -> Time:
        """Express ``time`` in ``unit`` (seconds convert only to and from ``dur``)."""
        time, unit = Time.parse(time), TimeUnit(unit)
        if unit == TimeUnit.DURATION:
            if self.max_duration is None:
                raise ValueError("converting to dur needs max_duration")
            total = self.convert(self.max_duration, time.unit)
            return Time(time.value / total.value, TimeUnit.DURATION)
        time = self._resolve_duration(time)
        if time.unit == unit:
            return time
        if TimeUnit.SECOND in (time.unit, unit):
            raise ValueError(f"cannot convert {time} to {unit.value}: wall-clock has no step rate")
        value = time.value / self._per_batch(time.unit) * self._per_batch(unit)
        if unit in _INTEGRAL:  # absorb float error: 0.3 * 100 batches is 30, not 29.999...
            value = round(value, 6)
        return Time(value, unit)

    def to_batches(self, time: Time | str) -> float:
        return float(self.convert(time, TimeUnit.BATCH).value)


@dataclass
class Timestamp:
    """Where training is, in every unit at once, plus wall-clock.

    ``train_time_s`` counts training only: evaluation runs with the training clock paused
    and is counted in ``eval_time_s``. ``sample`` counts samples drawn from the data (an
    algorithm that subsamples or reshapes a batch does not change it); ``token`` counts the
    tokens trained on (after sequence-length warmup or truncation).
    """

    epoch: int = 0
    batch: int = 0
    sample: int = 0
    token: int = 0
    batch_in_epoch: int = 0
    sample_in_epoch: int = 0
    train_time_s: float = 0.0
    eval_time_s: float = 0.0

    def get(self, unit: TimeUnit | str) -> float:
        unit = TimeUnit(unit)
        return {
            TimeUnit.EPOCH: self.epoch,
            TimeUnit.BATCH: self.batch,
            TimeUnit.SAMPLE: self.sample,
            TimeUnit.TOKEN: self.token,
            TimeUnit.SECOND: self.train_time_s,
        }[unit]

    def to_next_batch(self, samples: int, tokens: int = 0) -> None:
        self.batch += 1
        self.batch_in_epoch += 1
        self.sample += samples
        self.sample_in_epoch += samples
        self.token += tokens

    def to_next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.sample_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Interval:
    """Fires each time training crosses a multiple of ``every`` (0 disables it): the eval,
    log and checkpoint intervals.

    Epoch intervals are checked at epoch ends, all others at batch ends; ``dur`` resolves
    against max_duration.
    """

    def __init__(self, every: Time | str, converter: TimeConverter) -> None:
        every = Time.parse(every)
        if every.unit == TimeUnit.DURATION:
            every = converter._resolve_duration(every)  # in max_duration's unit, or a clear error
        if every.unit in (TimeUnit.SAMPLE, TimeUnit.TOKEN):
            every = converter.convert(every, TimeUnit.BATCH)
        self.unit, self.every = every.unit, float(every.value)
        self._next = 0.0

    def start(self, timestamp: Timestamp) -> None:
        """Align to the first multiple after ``timestamp`` (a fresh or resumed fit)."""
        if self.every > 0:
            self._next = (timestamp.get(self.unit) // self.every + 1) * self.every

    def due(self, timestamp: Timestamp, at_epoch_end: bool) -> bool:
        if self.every <= 0 or at_epoch_end != (self.unit == TimeUnit.EPOCH):
            return False
        now = timestamp.get(self.unit)
        if now + 1e-9 < self._next:
            return False
        self._next = (now // self.every + 1) * self.every
        return True
