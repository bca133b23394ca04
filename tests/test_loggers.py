"""Optional loggers (CSV, TensorBoard, MLflow): real runs, read back through each tool's reader."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import CrashAt

from speedup.callback import Callback
from speedup.config import ConfigError, config_hash, load_config
from speedup.run import run_config

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

#: A few steps of the quickstart: a training record every step, evaluations at 3 and 6.
SHORT = [
    "max_duration=6ba",
    "log_interval=1ba",
    "eval_interval=3ba",
    "progress_bar=false",
    "threads=1",
]


def short_run(run_dir: Path, *extra: str, callbacks: list = ()) -> dict:
    cfg = load_config("quickstart", [*SHORT, f"run_dir={run_dir}", *extra], smoke=True)
    return run_config(cfg, extra_callbacks=list(callbacks))


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def series(records: list[dict], name: str) -> list[tuple[int, float]]:
    """(step, value) of one metric in metrics.jsonl, in logged order."""
    return [(r["step"], r[name]) for r in records if name in r]


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def tensorboard_texts(log_dir: Path, tag: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    if tag + "/text_summary" not in events.Tags()["tensors"]:
        return []
    return [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag + "/text_summary")]


def csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return list(reader.fieldnames), rows


def assert_close_series(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """TensorBoard stores scalars as float32."""
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_tensorboard_and_csv_record_what_metrics_jsonl_records(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    short_run(run_dir, "loggers.tensorboard={}", "loggers.csv={}")
    records = jsonl(run_dir)
    assert [r["step"] for r in records if "eval/accuracy" in r] == [3, 6]

    # TensorBoard, through its own reader: every metric at its step, the config as text.
    scalars = tensorboard_scalars(run_dir / "tb")
    assert {"loss/train", "lr", "eval/accuracy", "eval/loss"} <= set(scalars)
    for name in ("loss/train", "lr", "eval/accuracy", "eval/loss"):
        assert_close_series(scalars[name], series(records, name))
    assert [s for s, _ in scalars["loss/train"]] == [1, 2, 3, 4, 5, 6]
    [text] = tensorboard_texts(run_dir / "tb", "hyperparameters")
    assert "| optimizer.lr | 0.01 |" in text and "| max_duration | 6ba |" in text

    # CSV: one row per record, the same values (floats written as Python prints them).
    columns, rows = csv_rows(run_dir / "metrics.csv")
    assert columns[:5] == ["step", "epoch", "sample", "token", "train_time_s"]
    assert set(columns) == set().union(*records)  # grown as new names appeared
    assert len(rows) == len(records)
    for row, record in zip(rows, records):
        for column in columns:
            if column in record:
                assert float(row[column]) == record[column], (record["step"], column)
            else:  # training rows have no eval values and the other way round
                assert row[column] == ""


def test_csv_columns_grow_as_new_metric_names_appear(tmp_path: Path) -> None:
    class LogsLate(Callback):  # a metric name first seen at step 4
        def batch_end(self, state: State, logger: Logger) -> None:
            if state.timestamp.batch >= 4:
                logger.log_metrics({"late/metric": float(state.timestamp.batch)})

    run_dir = tmp_path / "run"
    short_run(run_dir, "loggers.csv={}", callbacks=[LogsLate()])
    columns, rows = csv_rows(run_dir / "metrics.csv")
    assert columns[-1] == "late/metric"
    assert [(r["step"], r["late/metric"]) for r in rows if r["late/metric"]] == [
        ("4", "4.0"),
        ("5", "5.0"),
        ("6", "6.0"),
    ]
    assert len(rows) == len(jsonl(run_dir))  # earlier rows were kept through the rewrites
    assert not (run_dir / "metrics.csv.tmp").exists()


def test_resumed_run_logs_each_step_once_and_the_config_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    options = ["loggers.tensorboard={}", "loggers.csv={}", "checkpoint.interval=2ba"]
    with pytest.raises(RuntimeError, match="simulated crash at step 6"):
        short_run(run_dir, *options, callbacks=[CrashAt(6)])
    summary = short_run(run_dir, *options)
    # Step 5 was logged before the crash and is logged again after resuming from step 4.
    assert summary["resumed_from"].endswith("ba4")
    records = jsonl(run_dir)
    assert [r["step"] for r in records if "loss/train" in r] == [1, 2, 3, 4, 5, 6]

    scalars = tensorboard_scalars(run_dir / "tb")  # the purge marker hides the first step 5
    assert_close_series(scalars["loss/train"], series(records, "loss/train"))
    assert_close_series(scalars["eval/accuracy"], series(records, "eval/accuracy"))
    assert len(tensorboard_texts(run_dir / "tb", "hyperparameters")) == 1
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 2

    _, rows = csv_rows(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [r["step"] for r in records]
    assert [r["loss/train"] for r in rows if r["loss/train"]] == [
        repr(v) for _, v in series(records, "loss/train")
    ]


def test_a_fresh_run_replaces_what_an_earlier_run_in_the_directory_logged(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    short_run(run_dir, "loggers.tensorboard={}", "loggers.csv={}", "seed=1")
    short_run(run_dir, "loggers.tensorboard={}", "loggers.csv={}", "seed=2", "resume=never")
    records = jsonl(run_dir)
    scalars = tensorboard_scalars(run_dir / "tb")
    assert_close_series(scalars["loss/train"], series(records, "loss/train"))
    assert len(tensorboard_texts(run_dir / "tb", "hyperparameters")) == 1
    assert len(csv_rows(run_dir / "metrics.csv")[1]) == len(records)
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1


def test_a_log_dir_outside_the_run_keeps_earlier_files_and_hides_their_scalars(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared-tb"
    option = f"loggers.tensorboard.log_dir={shared}"
    short_run(tmp_path / "a", option, "seed=1")
    short_run(tmp_path / "b", option, "seed=2")
    assert len(list(shared.glob("events.out.tfevents.*"))) == 2
    scalars = tensorboard_scalars(shared)  # the second run's purge marker at step 0
    assert_close_series(scalars["loss/train"], series(jsonl(tmp_path / "b"), "loss/train"))


@pytest.mark.slow  # MLflow's first use of a SQLite store creates its tables: about 8 s
def test_mlflow_run_holds_the_config_once_and_the_metric_history(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    options = ["loggers.mlflow.experiment=quick", "checkpoint.interval=2ba"]
    with pytest.raises(RuntimeError, match="simulated crash at step 6"):
        short_run(run_dir, *options, callbacks=[CrashAt(6)])
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    assert saved["tracking_uri"] == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    assert client.get_run(saved["run_id"]).info.status == "FAILED"

    short_run(run_dir, *options)  # resumes the same MLflow run
    assert json.loads((run_dir / "mlflow_run.json").read_text()) == saved
    [experiment] = [e for e in client.search_experiments() if e.name == "quick"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == saved["run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == "run" and run.data.tags["speedup.run_dir"] == str(run_dir)

    params = run.data.params
    assert params["optimizer.lr"] == "0.01" and params["max_duration"] == "6ba"
    assert params["loggers.mlflow.experiment"] == "quick"
    assert params["seed"] == "17" and params["data.batch_size"] == "8"

    records = jsonl(run_dir)
    for name in ("loss/train", "lr", "eval/accuracy", "eval/loss"):
        history = client.get_metric_history(run.info.run_id, name)
        got = sorted((m.step, m.timestamp, m.value) for m in history)
        last = {step: value for step, _, value in got}  # the value logged last at each step
        assert sorted(last.items()) == series(records, name), name  # exact: stored as doubles
    # Step 5 came after the checkpoint (ba4) and before the crash: logged twice in MLflow.
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/train")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 5, 6]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["loggers.tensorbord={}"],
            "loggers: unknown logger 'tensorbord' (did you mean 'tensorboard'?); "
            "available: csv, mlflow, tensorboard",
        ),
        (["loggers.csv.pth=x.csv"], "loggers.csv.pth: unknown key (did you mean 'path'?)"),
        (["loggers.tensorboard.flush_secs=soon"], "loggers.tensorboard.flush_secs: wrong type"),
        (["loggers.tensorboard.flush_secs=0"], "loggers.tensorboard: flush_secs must be > 0"),
        (["loggers.mlflow.experiment=''"], "loggers.mlflow: experiment must be a non-empty"),
        (["loggers.mlflow.tags=[a]"], "loggers.mlflow.tags: wrong type: got ['a'], expected"),
        (["loggers.mlflow.run_dir=x"], "loggers.mlflow.run_dir: unknown key; allowed:"),
        (["loggers.csv=yes"], "loggers.csv: expected a mapping of arguments"),
        (["loggers.jsonl={}"], "loggers.jsonl: metrics.jsonl is always written"),
    ],
)
def test_bad_logger_settings_are_named_before_training(overrides: list, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", overrides)
    assert str(err.value).startswith("the command line: ")
    assert message in str(err.value)


def test_logger_errors_name_the_recipe_file(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("extends: quickstart\nloggers:\n  csv: {}\n  tensorboard: {logdir: tb}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(recipe))
    assert str(err.value).startswith(f"{recipe}: loggers.tensorboard.logdir: unknown key")
    assert "(did you mean 'log_dir'?)" in str(err.value)


@pytest.mark.parametrize(("name", "module"), [("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_missing_package_fails_at_load_naming_the_install(
    monkeypatch: pytest.MonkeyPatch, name: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # how Python blocks an import
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [f"loggers.{name}={{}}"])
    assert f"loggers.{name}: the {name} logger needs the {module!r} package" in str(err.value)
    assert f"pip install 'speedup[{name}]'" in str(err.value)


def test_loggers_leave_the_run_identity_alone() -> None:
    plain = load_config("quickstart")
    logged = load_config("quickstart", ["loggers.csv={}", "loggers.tensorboard.log_dir=/tmp/x"])
    assert config_hash(logged) == config_hash(plain)
    assert logged.loggers == {"csv": {}, "tensorboard": {"log_dir": "/tmp/x"}}


def test_importing_speedup_imports_neither_tensorboard_nor_mlflow() -> None:
    code = (
        "import sys, speedup, speedup.run, speedup.loggers, speedup.config\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard')"
        " or m == 'torch.utils.tensorboard'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow  # two torchrun processes
def test_only_rank_zero_writes_the_optional_logs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "speedup", "run", "mnist1d-lottery-mlp", "--smoke", "--nproc", "2"]
        + ["device=cpu", "threads=1", "progress_bar=false", "max_duration=4ba", "log_interval=1ba"]
        + ["loggers.csv={}", "loggers.tensorboard={}", "run_dir=two"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "two"
    records = jsonl(run_dir)
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    assert_close_series(
        tensorboard_scalars(run_dir / "tb")["loss/train"], series(records, "loss/train")
    )
    assert [int(r["step"]) for r in csv_rows(run_dir / "metrics.csv")[1]] == [
        r["step"] for r in records
    ]


def test_progress_off_a_terminal_is_one_plain_line_per_record():
    import io

    from conftest import loaders, make_blobs, tiny_model

    from speedup.loggers import ProgressBar
    from speedup.trainer import Trainer

    stream = io.StringIO()  # not a terminal, like a pipe or a log file
    train, evaluation = loaders(make_blobs(n=64), batch_size=16)  # 4 batches an epoch
    Trainer(
        tiny_model(),
        train,
        "3ep",
        eval_dataloader=evaluation,
        eval_interval="1ep",
        log_interval="2ba",
        loggers=[ProgressBar(stream)],
    ).fit()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no redraws, no escape codes
    lines = text.splitlines()
    train_lines = [line for line in lines if "loss " in line and "eval" not in line]
    eval_lines = [line for line in lines if "eval_acc" in line]
    assert [line.split()[1] for line in train_lines] == [
        "2/12",
        "4/12",
        "6/12",
        "8/12",
        "10/12",
        "12/12",
    ]
    assert [line.split()[1] for line in eval_lines] == ["4/12", "8/12", "12/12"]
    assert len(lines) == len(train_lines) + len(eval_lines)
