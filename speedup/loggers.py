"""Logging: a Logger that fans out to destinations (JSONL file, progress bar, ...).

Destinations are callbacks too, so a progress bar can follow batches. They run after the
algorithms and the other callbacks at every event.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from speedup.callback import Callback

if TYPE_CHECKING:
    from speedup.state import State

__all__ = ["Logger", "LoggerDestination", "JSONLLogger", "ProgressBar"]


class LoggerDestination(Callback):
    """Where metrics go. Override ``log_metrics`` and optionally ``log_hyperparameters``."""

    def log_metrics(self, metrics: dict[str, float], state: State) -> None:
        pass

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        pass


class Logger:
    """What algorithms and callbacks call to record a metric."""

    def __init__(self, destinations: list[LoggerDestination] | None = None) -> None:
        self.destinations = list(destinations or [])
        self.state: State | None = None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        assert self.state is not None, "Logger is bound to a State by the Trainer"
        for destination in self.destinations:
            destination.log_metrics(metrics, self.state)

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        for destination in self.destinations:
            destination.log_hyperparameters(params)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Infinity
    return value


class JSONLLogger(LoggerDestination):
    """One JSON object per logged step or evaluation, with the time in every unit."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: TextIO | None = None  # opened on the first record

    def log_metrics(self, metrics: dict[str, float], state: State) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        ts = state.timestamp
        record = {
            "step": ts.batch,
            "epoch": ts.epoch,
            "sample": ts.sample,
            "token": ts.token,
            "train_time_s": round(ts.train_time_s, 6),
        }
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


_SHOWN = {
    "loss/train": "loss",
    "throughput/samples_per_s": "sp/s",
    "eval/accuracy": "eval_acc",
    "eval/loss": "eval_loss",
}


class ProgressBar(LoggerDestination):
    """A tqdm bar over training batches (loss, throughput, ETA) and one per evaluation."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._train = None
        self._eval = None
        self._postfix: dict[str, str] = {}

    def fit_start(self, state: State, logger: Logger) -> None:
        from tqdm.auto import tqdm

        total = None
        if state.converter is not None:
            try:
                total = math.ceil(state.converter.to_batches(state.max_duration))
            except ValueError:  # a wall-clock duration has no batch count
                total = None
        self._train = tqdm(
            total=total,
            initial=state.timestamp.batch,
            desc="train",
            unit="ba",
            file=self.stream,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._train is not None:
            self._train.update(1)

    def log_metrics(self, metrics: dict[str, float], state: State) -> None:
        if self._train is None:
            return
        for key, label in _SHOWN.items():
            if key in metrics:
                self._postfix[label] = f"{_plain(metrics[key]):.4g}"
        self._train.set_postfix(self._postfix, refresh=False)

    def eval_start(self, state: State, logger: Logger) -> None:
        from tqdm.auto import tqdm

        total = len(state.eval_dataloader) if hasattr(state.eval_dataloader, "__len__") else None
        self._eval = tqdm(
            total=total, desc="eval", unit="ba", leave=False, file=self.stream, mininterval=0.5
        )

    def eval_batch_end(self, state: State, logger: Logger) -> None:
        if self._eval is not None:
            self._eval.update(1)

    def eval_end(self, state: State, logger: Logger) -> None:
        if self._eval is not None:
            self._eval.close()
            self._eval = None

    def close(self) -> None:
        for bar in (self._eval, self._train):
            if bar is not None:
                bar.close()
        self._train = self._eval = None
