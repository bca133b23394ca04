"""The benchmark sweep: suite validation, combinations, conflicts, caching and resume."""

import json

import pytest
from speedup.benchmarks.harness import configurations, load_suite

from speedup.config import ConfigError


def write_suite(tmp_path, text):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


BASE = """
workload: {recipe: quickstart, overrides: [data.num_train=256, data.num_test=64]}
target: {metric: accuracy, value: 0.2}
budget: 4ba
eval_interval: 2ba
seeds: [1]
timing: {steps: 2, repeats: 1, positions: [0.5]}
"""


def test_combinations_in_suite_order(tmp_path):
    suite = load_suite(
        str(
            write_suite(
                tmp_path,
                BASE
                + """
algorithms: {label_smoothing: {}, magnitude_pruning: {sparsity: 0.5}, rewinding: {}}
combinations: [singles, pairs, full, [rewinding, magnitude_pruning]]
""",
            )
        )
    )
    names = ["+".join(c) or "baseline" for c in configurations(suite)]
    assert names == [
        "baseline",
        "label_smoothing",
        "magnitude_pruning",
        "rewinding",
        "label_smoothing+magnitude_pruning",
        "label_smoothing+rewinding",
        "magnitude_pruning+rewinding",
        "label_smoothing+magnitude_pruning+rewinding",
    ]  # the explicit pair is the same configuration as the canonical one: run once


@pytest.mark.parametrize(
    "extra, needle",
    [
        ("algorithms: {lable_smoothing: {}}\n", "unknown algorithm 'lable_smoothing'"),
        ("algorithms: {}\nsurprise: 1\n", "unknown key 'surprise'"),
        ("algorithms: {label_smoothing: {}}\ncombinations: [triples]\n", "'triples' is not one"),
    ],
)
def test_suite_validation_errors(tmp_path, extra, needle):
    with pytest.raises(ConfigError, match=needle):
        load_suite(str(write_suite(tmp_path, BASE + extra)))


def test_unknown_workload_and_metric_not_produced(tmp_path):
    with pytest.raises(ConfigError, match="workload.recipe: unknown recipe 'nope'"):
        load_suite(str(write_suite(tmp_path, BASE.replace("quickstart", "nope"))))
    text = BASE.replace("metric: accuracy", "metric: perplexity")
    with pytest.raises(ConfigError, match="'perplexity' is not produced.*accuracy, loss"):
        load_suite(str(write_suite(tmp_path, text)))
    with pytest.raises(ConfigError, match="unknown suite 'nope'"):
        load_suite("nope")


def test_sweep_runs_reports_conflicts_and_resumes(tmp_path, capsys):
    from speedup.benchmarks.harness import run_suite

    suite = load_suite(
        str(
            write_suite(
                tmp_path,
                BASE
                + """
algorithms: {label_smoothing: {alpha: 0.1}, rewinding: {}}
combinations: [singles, pairs]
""",
            )
        )
    )
    out = tmp_path / "out"
    results = run_suite(suite, out, progress=False)
    assert set(results["conflicts"]) == {"rewinding", "label_smoothing+rewinding"}
    assert [r["config"] for r in results["runs"]] == ["baseline", "label_smoothing"]
    assert set(results["step_cost"]) == {"baseline", "label_smoothing"}
    run = results["runs"][1]
    assert run["steps"] == 4 and run["curve"][-1]["step"] == 4
    assert run["steps_to_target"] is None or 0 < run["steps_to_target"] <= 4
    assert run["curve"][-1]["flops"] > 0 and run["curve"][0]["flops"] < run["curve"][-1]["flops"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"][1]["final"] == run["final"]
    assert (out / "report.md").exists()
    first_out = capsys.readouterr().out
    assert "not run, conflict: rewinding" in first_out

    # Rerun: everything is reused, nothing retrained; the cached parts are identical.
    again = run_suite(suite, out, progress=False)
    assert all(r["cached"] for r in again["runs"])
    assert [r["final"] for r in again["runs"]] == [r["final"] for r in results["runs"]]
    assert "cached baseline seed 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name", ["shapes2d-named", "stdlib-gpt", "resnet50-imagenet", "gpt2-c4", "bert-c4"]
)
def test_shipped_suites_validate_with_and_without_smoke(name):
    suite = load_suite(name)
    assert suite.algorithms and suite.seeds
    smoke = load_suite(name, smoke=True)
    assert smoke.budget == "3ba"


def test_cli_bench_list_and_report_errors(capsys, tmp_path):
    from speedup.cli import main

    assert main(["bench", "--list"]) == 0
    assert "shapes2d-named" in capsys.readouterr().out.split()
    assert main(["bench", "nope"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "nor results.json" in capsys.readouterr().err


def test_parallel_sweep_runs_in_separate_processes_with_the_same_results(tmp_path):
    from speedup.benchmarks.harness import run_suite

    text = BASE + "\nalgorithms: {label_smoothing: {alpha: 0.1}}\ncombinations: [singles]\n"
    suite = load_suite(str(write_suite(tmp_path, text)))
    serial = run_suite(suite, tmp_path / "serial", progress=False)
    parallel = run_suite(suite, tmp_path / "parallel", progress=False, parallel=2)
    assert [r["config"] for r in parallel["runs"]] == [r["config"] for r in serial["runs"]]
    assert not any(r["cached"] for r in parallel["runs"])
    for a, b in zip(serial["runs"], parallel["runs"]):
        assert a["final"] == pytest.approx(b["final"], rel=1e-6)  # same seeds, same runs
        assert b["curve"][-1]["flops"] == a["curve"][-1]["flops"]
    logs = sorted(p.name for p in (tmp_path / "parallel" / "requests").glob("*.log"))
    assert len(logs) == len(parallel["runs"]) == 2
