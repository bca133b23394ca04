"""``speedup report RUN_DIR`` (PNG plots) and the table ``speedup run`` prints at the end."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from speedup.cli import main
from speedup.run_report import format_run_summary, format_seconds, format_value, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Six steps with an evaluation every two, logging every step: a few seconds on one CPU thread.
SHORT = ["progress_bar=false", "max_duration=6ba", "eval_interval=2ba", "log_interval=1ba"]
PRUNE_AT_STEP_2 = [
    "algorithms.magnitude_pruning.sparsity=0.5",
    "algorithms.magnitude_pruning.at=2ba",
]


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def train(run_dir: Path, *overrides: str) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out = cli("run", "quickstart", "--smoke", f"run_dir={run_dir}", *SHORT, *overrides)
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("dense") / "run"
    return run_dir, train(run_dir)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pruned") / "run"
    train(run_dir, *PRUNE_AT_STEP_2)
    return run_dir


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, path
    height, width, _ = imread(path).shape  # decodes: a whole, valid image
    assert height > 200 and width > 200


# -- speedup report ------------------------------------------------------------------------------


def test_report_writes_the_plots_of_a_run(dense_run):
    run_dir, _ = dense_run
    code, out = cli("report", str(run_dir))
    assert code == 0
    printed = [Path(line) for line in out.splitlines()]
    assert [p.name for p in printed] == ["loss.png", "eval.png", "lr.png", "throughput.png"]
    assert all(p.parent == run_dir / "plots" for p in printed)
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == sorted(p.name for p in printed)
    for path in printed:
        assert_png(path)
    assert not (run_dir / "plots" / "sparsity.png").exists()  # no pruning, no sparsity plot


def test_a_pruning_run_also_gets_a_sparsity_plot(pruned_run):
    logged = [r for r in records(pruned_run) if "sparsity/global" in r]
    assert [r["step"] for r in logged] == [2] and logged[0]["sparsity/global"] == 0.5
    paths = plot_run(pruned_run)
    assert [p.name for p in paths] == [
        "loss.png",
        "eval.png",
        "lr.png",
        "throughput.png",
        "sparsity.png",
    ]
    for path in paths:
        assert_png(path)


def test_one_eval_panel_per_metric(dense_run, tmp_path):
    from matplotlib.image import imread

    run_dir, _ = dense_run
    # The same run with a third eval metric: the eval figure grows by one row of panels.
    extra = tmp_path / "extra"
    extra.mkdir()
    lines = []
    for record in records(run_dir):
        if "eval/accuracy" in record:
            record["eval/top5"] = 1.0
        lines.append(json.dumps(record))
    (extra / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (two,) = [p for p in plot_run(run_dir, out=tmp_path / "two") if p.name == "eval.png"]
    (three,) = [p for p in plot_run(extra) if p.name == "eval.png"]
    height_two, height_three = imread(two).shape[0], imread(three).shape[0]
    expected = (3 * 2.8 + 0.6) / (2 * 2.8 + 0.6)  # figure heights in inches, as plot_run sets
    assert height_three / height_two == pytest.approx(expected, rel=0.02)


def test_report_errors_name_the_directory_and_what_it_needs(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "metrics.jsonl" in err and "results.json" in err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "missing: no such directory" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "epoch": 0}\n{"step": 2, "lo')
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no metrics to plot" in capsys.readouterr().err


# -- the end-of-run table ------------------------------------------------------------------------


def test_end_of_run_table_shows_the_summary(dense_run):
    run_dir, out = dense_run
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = out.splitlines()
    assert lines[0] == f"run quickstart  seed {summary['seed']}  cpu"
    assert lines[-1] == f"run dir: {run_dir}"
    assert all(len(line) <= 80 for line in lines[:-1])
    rows = {line.split()[0]: line.split() for line in lines[1:-1] if line.strip("-")}
    assert set(summary["metrics"]) == {"accuracy", "loss"}
    for name, value in summary["metrics"].items():
        shown = rows[name][1]
        assert shown == format_value(value) and float(shown) == pytest.approx(value, abs=5e-5)
    assert rows["steps"][1] == str(summary["steps"]) == "6"
    assert rows["steps"][3] == str(summary["epochs"])
    assert rows["samples"][1] == f"{summary['samples']:,}" and rows["samples"][3] == "-"
    train_time = " ".join(rows["train"][2:4])
    assert train_time == format_seconds(summary["train_time_s"])
    assert " ".join(rows["train"][6:8]) == format_seconds(summary["eval_time_s"])
    rate = summary["samples"] / summary["train_time_s"]
    assert rows["throughput"][2] == "samples/s"
    assert float(rows["throughput"][1].replace(",", "")) == pytest.approx(rate, rel=0.01, abs=0.05)


def test_end_of_run_table_shows_the_best_evaluation(dense_run):
    run_dir, out = dense_run
    evals = [r for r in records(run_dir) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    best_loss = min(evals, key=lambda r: (r["eval/loss"], r["step"]))
    best_acc = max(evals, key=lambda r: (r["eval/accuracy"], -r["step"]))
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    loss, accuracy = best_loss["eval/loss"], best_acc["eval/accuracy"]
    assert rows["loss"][2:] == [format_value(loss), "(min)", str(best_loss["step"])]
    assert rows["accuracy"][2:] == [format_value(accuracy), "(max)", str(best_acc["step"])]


def test_table_for_a_token_run_stopped_early_without_eval(dense_run):
    run_dir, _ = dense_run
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(
        metrics={},
        tokens=2_000_000,
        samples=4_000,
        train_time_s=3725.0,
        stopped_early=True,
        stop_reason="eval/accuracy stopped improving",
        processes=2,
    )
    lines = format_run_summary(summary, []).splitlines()
    assert lines[0].endswith("cpu x2")
    assert "eval metric  (no eval data)" in lines
    assert "1h 02m" in next(line for line in lines if line.startswith("train time"))
    throughput = next(line for line in lines if line.startswith("throughput"))
    assert "1.1 samples/s" in throughput and "537 tokens/s" in throughput
    assert "stopped early: eval/accuracy stopped improving" in lines
    assert all(len(line) <= 80 for line in lines)


def test_best_ignores_nan_and_knows_which_way_is_better():
    from speedup.run_report import best_eval

    logged = [
        {"step": 1, "eval/loss": 2.0, "eval/accuracy": 0.5, "eval/perplexity": 9.0},
        {"step": 2, "eval/loss": math.nan, "eval/accuracy": 0.7, "eval/perplexity": 7.0},
        {"step": 3, "eval/loss": 1.5, "eval/accuracy": 0.7, "eval/perplexity": 8.0},
    ]
    assert best_eval(logged) == {
        "loss": (1.5, 3),
        "accuracy": (0.7, 2),  # the first step to reach it
        "perplexity": (7.0, 2),
    }


def test_language_model_table_shows_each_best_with_its_step_and_direction():
    """An LM run's metrics (loss, perplexity, accuracy, BERT's masked accuracy): each row's best
    is the minimum of a cost and the maximum otherwise, with the step it was first reached."""
    logged = [
        {"step": 200, "eval/loss": 5.9, "eval/perplexity": 365.0, "eval/accuracy": 0.08},
        {"step": 400, "eval/loss": 5.2, "eval/perplexity": 181.3, "eval/accuracy": 0.11},
        {"step": 600, "eval/loss": 5.3, "eval/perplexity": 200.3, "eval/accuracy": 0.10},
        {"step": 600, "eval/masked_accuracy": 0.2, "eval/bits_per_byte": 1.4},
    ]
    summary = {
        "recipe": "stdlib-gpt",
        "seed": 17,
        "steps": 600,
        "metrics": {"loss": 5.3, "perplexity": 200.3, "accuracy": 0.10, "masked_accuracy": 0.2},
    }
    rows = {
        line.split()[0]: line.split()[1:]
        for line in format_run_summary(summary, logged).splitlines()
    }
    assert rows["loss"] == [format_value(5.3), format_value(5.2), "(min)", "400"]
    assert rows["perplexity"] == [format_value(200.3), format_value(181.3), "(min)", "400"]
    assert rows["accuracy"] == [format_value(0.10), format_value(0.11), "(max)", "400"]
    assert rows["masked_accuracy"] == [format_value(0.2), format_value(0.2), "(max)", "600"]
    assert rows["bits_per_byte"] == ["-", format_value(1.4), "(min)", "600"]


def test_which_way_is_better_is_read_from_whole_words():
    from speedup.run_report import lower_is_better

    costs = ["loss", "eval_loss", "top1_error", "perplexity", "cross_entropy", "bits_per_byte"]
    assert all(lower_is_better(m) for m in costs)
    gains = ["accuracy", "masked_accuracy", "answer_accuracy", "f1", "lossless_acc", "power"]
    assert not any(lower_is_better(m) for m in gains)  # no "wer" in answer, no "loss" in lossless
