"""The benchmarks run end to end at tiny sizes and print their machine-readable last line.

Their figures are not asserted (shared machines are noisy); their arithmetic is."""

import json
import math

from speedup.benchmarks import algorithm_costs, data_throughput, overhead, time_to_accuracy


def last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_overhead(capsys):
    results = overhead.main(["--repeats", "1", "--mlp-steps", "5", "--cnn-steps", "2"])
    line = last_line(capsys)
    assert line.startswith("mlp_overhead_us=") and "cnn_ratio_noop4=" in line
    assert results["cnn_ratio"] > 0 and math.isfinite(results["mlp_overhead_us"])


def test_algorithm_costs(capsys):
    results = algorithm_costs.main(["--repeats", "1", "--steps", "2"])
    assert set(results) == {"pruning_step_ratio", "resizing_step_ratio"}
    assert last_line(capsys).startswith("pruning_step_ratio=")


def test_data_throughput(capsys):
    results = data_throughput.main(
        ["--passes", "1", "--num-train", "512", "--workers", "0", "--steps", "40"]
    )
    assert results["tensor_loader_samples_per_s"] > 0
    assert 0 <= results["quickstart_data_wait_fraction"] <= 1


def test_time_to_target_reads_the_first_crossing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 10, "train_time_s": 1.0, "eval/accuracy": 0.5},
        {"step": 15, "train_time_s": 1.5, "loss/train": 0.3},
        {"step": 20, "train_time_s": 2.0, "eval/accuracy": 0.92},
        {"step": 30, "train_time_s": 3.0, "eval/accuracy": 0.95},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert time_to_accuracy.time_to_target(path, 0.9) == (2.0, 20)
    assert time_to_accuracy.time_to_target(path, 0.99) == (math.inf, math.inf)


def test_time_to_accuracy_runs(capsys, tmp_path):
    time_to_accuracy.main(
        ["--recipes", "quickstart", "--target", "0.2", "--out", str(tmp_path), "max_duration=2ep"]
    )
    assert last_line(capsys).startswith("quickstart_tta_s=")


def test_memory_benchmark_reports_each_phase():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "speedup.benchmarks.memory", "quickstart", "max_duration=2ba"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "(2 steps)" in lines[0]
    values = {line[:44].strip(): float(line[44:].split()[0]) for line in lines[1:]}
    assert list(values)[:2] == ["python interpreter", "import torch"]
    assert values["import torch"] > values["python interpreter"]  # torch is most of it
    assert (
        values["peak over the run"]
        >= max(v for k, v in values.items() if k != "peak over the run") - 1
    )
