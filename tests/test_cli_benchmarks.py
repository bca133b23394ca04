"""The command-line timing benchmarks run end to end and print what they measured, and on
what. Their figures are not asserted (shared machines are noisy); what they report is."""

from __future__ import annotations

import json

import pytest
from speedup.benchmarks import quickstart_time, startup


@pytest.mark.slow  # a fresh interpreter that imports torch and builds the data
def test_quickstart_time_runs_the_readme_command_and_names_the_machine(capsys, tmp_path):
    results = quickstart_time.main(
        ["--out", str(tmp_path), "max_duration=2ba", "eval_interval=1ba", "threads=1"]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("machine: ") and "cores" in out[0]
    assert out[1].startswith("load average before")
    assert "2 steps at 1 torch threads" in out[2]
    summary = json.loads((tmp_path / "run0" / "summary.json").read_text())
    assert summary["recipe"] == "quickstart" and summary["steps"] == 2
    assert results["quickstart_train_s"] == summary["train_time_s"]
    assert results["quickstart_accuracy"] == summary["metrics"]["accuracy"]
    assert results["quickstart_wall_s"] >= results["quickstart_train_s"]
    assert results["quickstart_cpu_s"] > 0
    assert out[-1].startswith("quickstart_wall_s=") and "quickstart_accuracy=" in out[-1]


def test_startup_times_help_and_list(capsys):
    results = startup.main(["--repeats", "1"])
    assert set(results) == {"help_wall_s", "help_cpu_s", "list_wall_s", "list_cpu_s"}
    assert all(value > 0 for value in results.values())
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("help_wall_s=")
