"""Logging: a Logger that fans out to destinations (JSONL file, progress bar, ...).

Destinations are callbacks too, so a progress bar can follow batches. They run after the
algorithms and the other callbacks at every event.

JSONL (``metrics.jsonl``) is always written; recipes add the destinations of ``LOGGERS`` in
their ``loggers:`` section (``csv``, ``tensorboard``, ``mlflow``), each writing inside the run
directory by default. TensorBoard and MLflow are optional packages, imported only by the
logger that uses them, never at ``import speedup``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from speedup.callback import Callback
from speedup.errors import MissingPackageError
from speedup.logger import Logger
from speedup.registry import Registry

if TYPE_CHECKING:
    from collections.abc import Callable

    from speedup.state import State

__all__ = [
    "Logger",
    "LoggerDestination",
    "JSONLLogger",
    "ProgressBar",
    "CSVLogger",
    "TensorBoardLogger",
    "MLflowLogger",
    "LOGGERS",
    "MissingPackageError",
    "build_loggers",
    "flatten",
]


class LoggerDestination(Callback):
    """Where metrics go. Override ``log_metrics`` and optionally ``log_hyperparameters``."""

    def log_metrics(self, metrics: dict[str, float], state: State) -> None:
        pass

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        pass

    @staticmethod
    def check_installed() -> None:
        """Raise :class:`MissingPackageError` when an optional package it needs is missing."""


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Infinity
    return value


def _record(metrics: dict[str, Any], state: State) -> dict[str, Any]:
    """A logged record: the time in every unit, then the metrics."""
    ts = state.timestamp
    record = {
        "step": ts.batch,
        "epoch": ts.epoch,
        "sample": ts.sample,
        "token": ts.token,
        "train_time_s": round(ts.train_time_s, 6),
    }
    record.update({k: _plain(v) for k, v in metrics.items()})
    return record


class JSONLLogger(LoggerDestination):
    """One JSON object per logged step or evaluation, with the time in every unit."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: TextIO | None = None  # opened on the first record

    def log_metrics(self, metrics: dict[str, float], state: State) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(_record(metrics, state)) + "\n")
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


def _short(value: Any) -> str:
    value = _plain(value)
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


class ProgressBar(LoggerDestination):
    """A tqdm bar over training batches (loss, throughput, ETA) and one per evaluation.

    Off a terminal (a pipe, a log file, a batch job) a bar's carriage-return redraws would fill
    the file, so it prints one plain line per logged record instead: the step, the progress and
    the record's loss/throughput (at ``log_interval``) or eval metrics (at each evaluation)."""

    def __init__(self, stream: TextIO | None = None, plain: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        #: Plain lines instead of a bar: by default when the stream is not a terminal.
        self.plain = plain if plain is not None else not (isatty is not None and isatty())
        self._train = None
        self._eval = None
        self._postfix: dict[str, str] = {}
        self._total: int | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        total = None
        if state.converter is not None:
            try:
                total = math.ceil(state.converter.to_batches(state.max_duration))
            except ValueError:  # a wall-clock duration has no batch count
                total = None
        self._total = total
        if self.plain:
            return
        from tqdm.auto import tqdm

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
        if self.plain:
            self._plain_line(metrics, state)
            return
        if self._train is None:
            return
        for key, label in _SHOWN.items():
            if key in metrics:
                self._postfix[label] = f"{_plain(metrics[key]):.4g}"
        self._train.set_postfix(self._postfix, refresh=False)

    def _plain_line(self, metrics: dict[str, float], state: State) -> None:
        shown = [f"{label} {_short(metrics[k])}" for k, label in _SHOWN.items() if k in metrics]
        if not shown:  # algorithms' own records (e.g. a schedule value) are for the log files
            return
        step = state.timestamp.batch
        where = f"step {step}/{self._total}" if self._total else f"step {step}"
        if self._total:
            where += f" ({100 * step / self._total:.0f}%)"
        print(f"{where}  {'  '.join(shown)}", file=self.stream, flush=True)

    def eval_start(self, state: State, logger: Logger) -> None:
        if self.plain:
            return
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


# -- optional destinations, chosen by a recipe's ``loggers:`` section ------------------------

#: Destinations by name for recipes' ``loggers:`` section (JSONL is always on, so not listed).
LOGGERS: Registry[type[LoggerDestination]] = Registry("logger")


def _require(module: str, extra: str, logger: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(
            f"the {logger} logger needs the {module!r} package, which is not installed: "
            f"pip install 'speedup[{extra}]' (or pip install {module})"
        )


def _inside(run_dir: str | Path | None, path: str | Path) -> Path:
    """``path`` as given when absolute (or without a run directory), else inside ``run_dir``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() or run_dir is None else Path(run_dir) / path


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: ``{"optimizer": {"lr": 0.1}}`` -> ``{"optimizer.lr": 0.1}``.
    An empty mapping stays, as ``{}``, so a section switched on with ``{}`` is still seen."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


@LOGGERS.register("csv")
class CSVLogger(LoggerDestination):
    """``metrics.csv``: one row per logged record (a training log or an evaluation).

    Wide format, one column per name: ``step, epoch, sample, token, train_time_s``, then the
    metrics in the order they first appear; a row leaves the metrics it lacks empty (training
    rows have no ``eval/`` values). A new metric name widens the header: the file is rewritten
    to a temporary file and renamed over the old one, so a reader never sees half a file. That
    happens once per new name, a handful of times a run. A fresh run starts a fresh file; a
    resumed one keeps the rows up to the checkpoint's step (the rest are logged again).
    """

    def __init__(self, path: str | Path = "metrics.csv", run_dir: str | Path | None = None):
        self.path = _inside(run_dir, path)
        self._columns: list[str] = []
        self._file: TextIO | None = None
        self._writer: csv.DictWriter | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self._open(state)

    def _open(self, state: State) -> None:
        if self._file is not None:
            return
        columns: list[str] = []
        rows: list[dict[str, str]] = []
        step = state.timestamp.batch
        if step > 0 and self.path.exists():  # resumed: keep what the checkpoint had seen
            columns, rows = self._read()
            rows = [r for r in rows if (at := _step(r)) is not None and at <= step]
        self._rewrite(columns, rows)

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def _rewrite(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        if self._file is not None:
            self._file.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            if columns:
                writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)
        self._columns = list(columns)
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self._columns)

    def log_metrics(self, metrics: dict[str, float], state: State) -> None:
        self._open(state)
        assert self._file is not None and self._writer is not None  # _open made them
        record = _record(metrics, state)
        new = [key for key in record if key not in self._columns]
        if new:
            self._file.close()
            rows = self._read()[1] if self._columns else []
            self._rewrite(self._columns + new, rows)
        self._writer.writerow(record)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(row.get("step") or "")
    except ValueError:  # a line cut short by a crash
        return None


@LOGGERS.register("tensorboard")
class TensorBoardLogger(LoggerDestination):
    """TensorBoard event files (default ``<run_dir>/tb``): every metric as a scalar at its
    step; the resolved config once, as text (``hyperparameters``).

    A resumed run's writer starts with a purge marker, so TensorBoard hides what the crashed
    writer logged past the checkpoint (the resumed run logs it again). A fresh run deletes the
    event files an earlier run left in its log directory when that directory lies inside the
    run directory (it is the run's own, as ``metrics.jsonl`` is); a log directory elsewhere
    is left alone and gets a purge marker at step 0, which hides the earlier scalars.
    """

    def __init__(
        self, log_dir: str | Path = "tb", flush_secs: int = 10, run_dir: str | Path | None = None
    ):
        if flush_secs <= 0:
            raise ValueError(f"flush_secs must be > 0, got {flush_secs}")
        self.log_dir = _inside(run_dir, log_dir)
        self.flush_secs = flush_secs
        self._owned = run_dir is not None and Path(run_dir).resolve() in (
            self.log_dir.resolve().parents
        )
        self._writer: Any = None  # a SummaryWriter, made on first use (optional package)

    @staticmethod
    def check_installed() -> None:
        _require("tensorboard", "tensorboard", "tensorboard")

    def _open(self, step: int) -> Any:
        if self._writer is None:
            self.check_installed()
            from torch.utils.tensorboard import SummaryWriter

            purge = step + 1 if step > 0 else 0
            if step == 0 and self._owned:  # a fresh run: an earlier run's files are stale
                for stale in self.log_dir.glob("events.out.tfevents.*"):
                    stale.unlink()
            self._writer = SummaryWriter(
                str(self.log_dir), purge_step=purge, flush_secs=self.flush_secs
            )
        return self._writer

    def fit_start(self, state: State, logger: Logger) -> None:
        self._open(state.timestamp.batch)

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {_text(v)} |" for k, v in flatten(params).items())
        self._open(0).add_text("hyperparameters", f"| key | value |\n|---|---|\n{rows}", 0)

    def log_metrics(self, metrics: dict[str, float], state: State) -> None:
        step = state.timestamp.batch
        writer = self._open(step)
        for key, value in _numbers(metrics).items():
            writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


#: MLflow refuses longer parameter values; a batch holds at most 100 params and 1000 metrics.
_MLFLOW_PARAM_CHARS = 6000
_MLFLOW_BATCH = 100


@LOGGERS.register("mlflow")
class MLflowLogger(LoggerDestination):
    """An MLflow run: the resolved config as params (once), every metric with its step.

    ``tracking_uri`` is any MLflow store, read as MLflow reads it (relative paths from the
    working directory): ``sqlite:///mlflow.db``, ``file:./mlruns`` (MLflow 3 accepts the file
    store only with ``MLFLOW_ALLOW_FILE_STORE=true``), ``http://host:5000``. The default is a
    SQLite store in the run directory, ``<run_dir>/mlflow.db``, whose experiments keep their
    artifacts in ``<run_dir>/mlruns``. The MLflow run's id is kept in
    ``<run_dir>/mlflow_run.json``, so a resumed training run continues the same MLflow run.

    A store write costs milliseconds (a SQLite commit), so metrics are buffered and written at
    the first checkpoint event (fired with the training clock paused) once the oldest is
    ``flush_secs`` old, at the end of each epoch, and when training ends or fails; only a hard
    kill loses the last few seconds.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "speedup",
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        flush_secs: float = 5.0,
        run_dir: str | Path | None = None,
    ):
        if not experiment.strip():
            raise ValueError("experiment must be a non-empty name")
        if flush_secs < 0:
            raise ValueError(f"flush_secs must be >= 0, got {flush_secs}")
        self.flush_secs = flush_secs
        self._pending: list[Any] = []  # mlflow Metric entities not yet written
        self._pending_since = 0.0
        self.run_dir = Path(run_dir).resolve() if run_dir is not None else None
        self._default_store = tracking_uri is None
        where = self.run_dir or Path.cwd()
        self.tracking_uri = tracking_uri or f"sqlite:///{where / 'mlflow.db'}"
        self.experiment = experiment
        self.run_name = run_name or (self.run_dir.name if self.run_dir else None)
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.run_id: str | None = None
        self._client: Any = None
        self._state: State | None = None

    @staticmethod
    def check_installed() -> None:
        _require("mlflow", "mlflow", "mlflow")

    @property
    def _run_file(self) -> Path | None:
        return self.run_dir / "mlflow_run.json" if self.run_dir else None

    def _start(self, fresh: bool) -> None:
        """Open the client and a run: a new one, or (resumed) the one this directory had."""
        if self.run_id is not None:
            return
        self.check_installed()
        import logging

        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # table creation
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        saved = self._saved_run() if not fresh else None
        if saved is not None:
            self.run_id = saved
            self._client.update_run(saved, status="RUNNING")
            return
        experiment = self._client.get_experiment_by_name(self.experiment)
        if experiment is None:
            artifacts = None
            if self._default_store and self.run_dir is not None:
                artifacts = (self.run_dir / "mlruns").as_uri()
            experiment_id = self._client.create_experiment(
                self.experiment, artifact_location=artifacts
            )
        else:
            experiment_id = experiment.experiment_id
        tags = {"speedup.run_dir": str(self.run_dir)} if self.run_dir else {}
        run = self._client.create_run(
            experiment_id, run_name=self.run_name, tags={**tags, **self.tags}
        )
        self.run_id = run.info.run_id
        if self._run_file is not None:
            record = {"tracking_uri": self.tracking_uri, "run_id": self.run_id}
            self._run_file.write_text(json.dumps(record) + "\n", encoding="utf-8")

    def _saved_run(self) -> str | None:
        if self._run_file is None or not self._run_file.exists():
            return None
        try:
            saved = json.loads(self._run_file.read_text(encoding="utf-8"))
        except ValueError:
            return None
        if saved.get("tracking_uri") != self.tracking_uri:  # another store: a new run there
            return None
        try:
            self._client.get_run(saved["run_id"])
        except Exception:  # deleted, or never reached the store: start a new run
            return None
        return saved["run_id"]

    def fit_start(self, state: State, logger: Logger) -> None:
        self._state = state
        self._start(fresh=state.timestamp.batch == 0)

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        self._start(fresh=True)
        from mlflow.entities import Param

        items = [
            Param(key, _text(value)[:_MLFLOW_PARAM_CHARS]) for key, value in flatten(params).items()
        ]
        for start in range(0, len(items), _MLFLOW_BATCH):
            self._client.log_batch(self.run_id, params=items[start : start + _MLFLOW_BATCH])

    def log_metrics(self, metrics: dict[str, float], state: State) -> None:
        self._state = state
        self._start(fresh=state.timestamp.batch == 0)
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), state.timestamp.batch
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending += [Metric(key, value, now, step) for key, value in _numbers(metrics).items()]

    def flush(self) -> None:
        """Write the buffered metrics to the store."""
        items, self._pending = self._pending, []
        for start in range(0, len(items), _MLFLOW_BATCH * 10):
            self._client.log_batch(self.run_id, metrics=items[start : start + _MLFLOW_BATCH * 10])

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self._pending and time.monotonic() - self._pending_since >= self.flush_secs:
            self.flush()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        if self._pending:
            self.flush()

    def close(self) -> None:
        """Write what is buffered; mark the run FINISHED, KILLED (preempted by a signal) or
        FAILED (an exception)."""
        if self.run_id is None or self._client is None:
            return
        if self._pending:
            self.flush()
        if sys.exc_info()[0] is not None:  # close() runs in the trainer's ``finally``
            status = "FAILED"
        elif self._state is not None and self._state.preempted:
            status = "KILLED"
        else:
            status = "FINISHED"
        self._client.set_terminated(self.run_id, status=status)


def build_loggers(section: dict[str, Any], run_dir: str | Path) -> list[LoggerDestination]:
    """The destinations a recipe's ``loggers:`` section names (``name -> arguments``), with
    their default files inside ``run_dir``."""
    made = []
    for name, args in section.items():
        make: Callable[..., LoggerDestination] = LOGGERS.get(name)  # each takes ``run_dir``
        made.append(make(**(args or {}), run_dir=run_dir))
    return made
