"""The built-in callbacks: lr_monitor, speed_monitor and early_stopping (speedup.callbacks)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import bad_arguments_test, loaders, make_blobs, metrics_records, smoke_run, tiny_model

from speedup.callback import CALLBACKS, Callback
from speedup.callbacks import EarlyStopping, LRMonitor, SpeedMonitor
from speedup.cli import main
from speedup.loggers import LoggerDestination
from speedup.time import Time, TimeConverter, Timestamp
from speedup.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class Records(LoggerDestination):
    """Keeps every logged record with a copy of the timestamp it was logged at."""

    def __init__(self):
        self.records = []

    def log_metrics(self, metrics, state):
        ts = state.timestamp
        self.records.append((dict(metrics), Timestamp(**ts.state_dict())))

    def train(self):
        return [(m, ts) for m, ts in self.records if "loss/train" in m]


class Plant(Callback):
    """Overwrites eval/accuracy with a planted value per step, before early stopping reads it."""

    def __init__(self, values: dict[int, float]):
        self.values = values

    def eval_end(self, state, logger):
        state.eval_metrics["accuracy"] = self.values[state.timestamp.batch]


class StopAtEpoch(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def epoch_checkpoint(self, state, logger):
        if state.timestamp.epoch == self.epoch:
            state.stop_training("interrupted")


# 64 samples in batches of 16: 4 batches per epoch.
SEQUENCE = [0.5, 0.6, 0.7, 0.65, 0.7, 0.69, 0.8, 0.9, 0.9, 0.9]


def planted(every_batches: int) -> dict[int, float]:
    return {every_batches * (i + 1): v for i, v in enumerate(SEQUENCE)}


def trainer(*callbacks, duration="10ep", eval_interval="1ep", loggers=()):
    train, evaluation = loaders(make_blobs(n=64), batch_size=16)
    return Trainer(
        tiny_model(),
        train,
        duration,
        eval_dataloader=evaluation,
        eval_interval=eval_interval,
        callbacks=list(callbacks),
        loggers=list(loggers),
        log_interval="1ba",
    )


# -- early stopping -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "eval_interval, every, patience, stop_step, best_step",
    [
        # Best 0.7 at the 3rd eval; 0.65 (1 eval later), 0.7 (not better: 2 later) -> stop.
        ("1ep", 4, "2ep", 20, 12),
        ("2ba", 2, "4ba", 10, 6),
        ("2ba", 2, "0.1dur", 10, 6),  # 0.1 of 10ep = 1ep = 4 batches
        ("1ep", 4, "3ep", 24, 12),  # 0.69 at ep6 is 3ep after the best
    ],
)
def test_early_stopping_stops_at_the_expected_step(
    eval_interval, every, patience, stop_step, best_step
):
    stopper = EarlyStopping(monitor="accuracy", patience=patience)
    t = trainer(Plant(planted(every)), stopper, eval_interval=eval_interval)
    t.fit()
    assert t.state.timestamp.batch == stop_step
    assert stopper.best == 0.7 and stopper.best_step == best_step
    reason = t.state.stop_reason
    assert reason.startswith("early stopping:") and "eval/accuracy" in reason
    assert f"0.7 (step {best_step})" in reason and patience in reason
    assert t.state.evaluated_at == stop_step  # the stopping evaluation is the last one


def test_min_delta_and_mode_min():
    # A loss that keeps falling, but by less than min_delta after the first eval.
    losses = {4 * (i + 1): 1.0 - 0.01 * i for i in range(10)}

    class PlantLoss(Callback):
        def eval_end(self, state, logger):
            state.eval_metrics["loss"] = losses[state.timestamp.batch]

    stopper = EarlyStopping(monitor="eval/loss", min_delta=0.05, patience="2ep")
    assert stopper.mode == "min" and stopper.monitor == "loss"
    t = trainer(PlantLoss(), stopper)
    t.fit()
    assert t.state.timestamp.batch == 12 and stopper.best == 1.0 and stopper.best_step == 4
    assert "by more than 0.05" in t.state.stop_reason
    # Without min_delta every eval improves: the run goes to its end, never stopped.
    stopper = EarlyStopping(monitor="loss", patience="2ep")
    t = trainer(PlantLoss(), stopper)
    t.fit()
    assert t.state.timestamp.batch == 40 and t.state.stop_reason == ""


def test_the_final_evaluation_never_counts_as_a_stop():
    stopper = EarlyStopping(monitor="accuracy", patience="2ep")
    t = trainer(Plant(planted(4)), stopper, duration="5ep")
    t.fit()  # patience runs out at the 5th eval, which is the end of training
    assert t.state.timestamp.batch == 20 and t.state.stop_reason == ""


def test_a_resumed_run_keeps_its_patience(tmp_path):
    straight = EarlyStopping(monitor="accuracy", patience="2ep")
    t = trainer(Plant(planted(4)), straight)
    t.fit()
    assert t.state.timestamp.batch == 20

    first = EarlyStopping(monitor="accuracy", patience="2ep")
    t = trainer(Plant(planted(4)), first, StopAtEpoch(4))
    t.fit()  # interrupted at ep4, one eval after the best (ep3)
    assert t.state.timestamp.batch == 16 and t.state.stop_reason == "interrupted"
    saved = t.save_checkpoint(tmp_path / "ck")

    resumed = EarlyStopping(monitor="accuracy", patience="2ep")
    t = trainer(Plant(planted(4)), resumed)
    t.load_checkpoint(saved)
    assert (resumed.best, resumed.best_at, resumed.best_step) == (0.7, 3, 12)
    t.fit()
    assert t.state.timestamp.batch == 20  # as the straight run: the patience was kept
    assert t.state.stop_reason == straight_reason(straight)

    # Control: a stopper that forgot the best starts again from 0.65 at ep4 and runs longer.
    t = trainer(Plant(planted(4)), EarlyStopping(monitor="accuracy", patience="2ep"))
    t.load_checkpoint(saved)
    t.state.callbacks[-1].load_state_dict({})
    t.fit()
    assert t.state.timestamp.batch > 20


def straight_reason(stopper: EarlyStopping) -> str:
    return f"early stopping: eval/accuracy has not improved on 0.7 (step 12) in {stopper.patience}"


def test_an_unknown_metric_and_a_run_without_eval_data_are_errors():
    t = trainer(EarlyStopping(monitor="acuracy"))
    with pytest.raises(ValueError, match=r"'acuracy' is not an eval metric.*accuracy, loss"):
        t.fit()
    train, _ = loaders(make_blobs(n=64), batch_size=16)
    t = Trainer(tiny_model(), train, "2ep", callbacks=[EarlyStopping()])
    with pytest.raises(ValueError, match="no eval data"):
        t.fit()
    assert t.state.timestamp.batch == 0  # refused before training


@pytest.mark.parametrize(
    "monitor, mode", [("accuracy", "max"), ("loss", "min"), ("perplexity", "min"), ("f1", "max")]
)
def test_mode_defaults_from_the_metric(monitor, mode):
    assert EarlyStopping(monitor=monitor).mode == mode
    assert EarlyStopping(monitor=monitor, mode="max").mode == "max"


test_bad_arguments_are_refused_at_construction = bad_arguments_test(
    EarlyStopping,
    [
        ({"mode": "maximum"}, "mode: 'maximum' is not allowed; allowed: max, min"),
        ({"patience": "3 epochs"}, "patience: unknown time unit"),
        ({"min_delta": -0.1}, "min_delta must be >= 0"),
        ({"monitor": ""}, "monitor must name an eval metric"),
    ],
)


# -- monitors ---------------------------------------------------------------------------------


def test_the_monitors_are_on_by_default_and_yours_replace_them():
    t = trainer()
    kinds = [type(c) for c in t.state.callbacks]
    assert kinds == [LRMonitor, SpeedMonitor]
    mine = SpeedMonitor(window="2ba")
    t = trainer(mine)
    assert [type(c) for c in t.state.callbacks] == [LRMonitor, SpeedMonitor]
    assert t.state.callbacks[1] is mine


def test_lr_monitor_logs_every_param_group():
    train, _ = loaders(make_blobs(n=64), batch_size=16)

    def two_groups(params):
        return torch.optim.SGD([{"params": params[:2], "lr": 0.1}, {"params": params[2:]}], lr=0.03)

    records = Records()
    t = Trainer(
        tiny_model(),
        train,
        "6ba",
        optimizer=two_groups,
        scheduler={"name": "linear"},
        loggers=[records],
        log_interval="2ba",
    )
    t.fit()
    logged = records.train()
    assert [ts.batch for _, ts in logged] == [2, 4, 6]
    for metrics, ts in logged:
        # The linear schedule's factor after ts.batch of 6 steps, applied to each group.
        factor = 1 - ts.batch / 6
        assert metrics["lr"] == pytest.approx(0.1 * factor)
        assert metrics["lr/group1"] == pytest.approx(0.03 * factor)
        assert list(metrics)[:3] == ["loss/train", "lr", "lr/group1"]


def test_speed_monitor_is_samples_over_train_time():
    records = Records()
    t = trainer(duration="2ep", loggers=[records])
    t.fit()
    logged = records.train()
    assert len(logged) == 8
    for metrics, ts in logged:
        assert ts.train_time_s > 0
        assert metrics["throughput/samples_per_s"] == ts.sample / ts.train_time_s
        assert metrics["throughput/batches_per_s"] == ts.batch / ts.train_time_s
        assert "throughput/tokens_per_s" not in metrics  # no tokens in these batches
        assert not any(k.startswith("throughput/moving/") for k in metrics)
    # The record has today's names, in today's order.
    assert list(logged[0][0])[:3] == ["loss/train", "lr", "throughput/samples_per_s"]


def fake_state(**timestamp):
    return SimpleNamespace(
        timestamp=Timestamp(**timestamp),
        converter=TimeConverter(10, 32, None, Time(100, "ba")),
        max_duration=Time(100, "ba"),
    )


def test_speed_monitor_tokens_and_moving_window():
    monitor = SpeedMonitor(window="2ba")
    state = fake_state()
    monitor.fit_start(state, None)
    # Batch k ends at k seconds, except batch 3 which took 3 seconds; 1000 tokens a batch.
    for k, t in enumerate([1.0, 2.0, 5.0, 6.0], start=1):
        state.timestamp = Timestamp(batch=k, sample=32 * k, token=1000 * k, train_time_s=t)
        monitor.batch_end(state, None)
    figures = monitor.train_log(state)
    assert figures["throughput/samples_per_s"] == 128 / 6.0
    assert figures["throughput/tokens_per_s"] == 4000 / 6.0
    # The last 2 batches: from batch 2 (2 s) to batch 4 (6 s).
    assert figures["throughput/moving/samples_per_s"] == 64 / 4.0
    assert figures["throughput/moving/batches_per_s"] == 2 / 4.0
    assert figures["throughput/moving/tokens_per_s"] == 2000 / 4.0

    # The window survives a checkpoint: a fresh monitor loaded with its state agrees.
    restored = SpeedMonitor(window="2ba")
    restored.load_state_dict(monitor.state_dict())
    assert restored.train_log(state) == figures


def test_speed_monitor_window_in_seconds_and_epochs():
    monitor = SpeedMonitor(window="3sec")
    state = fake_state()
    monitor.fit_start(state, None)
    for k in range(1, 6):  # a batch a second
        state.timestamp = Timestamp(batch=k, sample=32 * k, train_time_s=float(k))
        monitor.batch_end(state, None)
    assert monitor.train_log(state)["throughput/moving/batches_per_s"] == 3 / 3.0
    assert len(monitor._points) == 4  # batches 2..5: the one at the window's start is kept
    with pytest.raises(ValueError, match="window must be > 0"):
        SpeedMonitor(window="0ba")


def test_speed_monitor_with_a_window_in_a_real_run():
    records = Records()
    monitor = SpeedMonitor(window="1ep")
    t = trainer(monitor, duration="2ep", loggers=[records])
    t.fit()
    metrics, ts = records.train()[-1]
    first = monitor._points[0]
    assert first[1] == 4  # one epoch back: batch 4 of 8
    expected = (ts.sample - first[2]) / (ts.train_time_s - first[4])
    assert metrics["throughput/moving/samples_per_s"] == pytest.approx(expected)


# -- recipes and the command line -----------------------------------------------------------


def test_the_three_are_registered_and_listed(capsys):
    assert {"lr_monitor", "speed_monitor", "early_stopping"} <= set(CALLBACKS.names())
    assert CALLBACKS.get("early_stopping") is EarlyStopping
    assert main(["list", "callbacks"]) == 0
    out = capsys.readouterr().out
    for name, words in [
        ("early_stopping", "Stops training when an eval metric"),
        ("lr_monitor", "Logs the learning rate of every param group"),
        ("speed_monitor", "Logs training throughput"),
    ]:
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert words in line


@pytest.mark.parametrize(
    "arguments, needles",
    [
        ("{pateince: 2ep}", ["callbacks.early_stopping.pateince", "did you mean 'patience'"]),
        ("{patience: 2}", ["callbacks.early_stopping.patience", "wrong type"]),
        (
            "{patience: 2 epochs}",
            ["callbacks.early_stopping", "patience: unknown time unit 'epochs'"],
        ),
        ("{mode: maximum}", ["callbacks.early_stopping", "mode: 'maximum' is not allowed"]),
    ],
)
def test_a_bad_early_stopping_argument_exits_2_with_one_line(capsys, tmp_path, arguments, needles):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: quickstart\ncallbacks:\n  early_stopping: {arguments}\n")
    code = main(["run", str(recipe), f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert str(recipe) in err
    for needle in needles:
        assert needle in err
    assert not (tmp_path / "run").exists()  # nothing trained


def test_early_stopping_from_a_recipe_stops_a_real_run(tmp_path):
    # min_delta 1.0: accuracy can never improve on the first evaluation's, so the run stops
    # 2 epochs after it: after epoch 3, at step 24 (64 samples in batches of 8 under --smoke).
    run_dir = tmp_path / "run"
    code = smoke_run(
        run_dir,
        "max_duration=10ep",
        "eval_interval=1ep",
        "callbacks.early_stopping.monitor=accuracy",
        "callbacks.early_stopping.min_delta=1.0",
        "callbacks.early_stopping.patience=2ep",
        "threads=1",
    )
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop_reason"].startswith("early stopping: eval/accuracy has not improved")
    records = metrics_records(run_dir)
    assert max(r["step"] for r in records) == 24
    evals = [r["step"] for r in records if "eval/accuracy" in r]
    assert evals == [8, 16, 24]
    assert all("lr" in r and "throughput/samples_per_s" in r for r in records if "loss/train" in r)
