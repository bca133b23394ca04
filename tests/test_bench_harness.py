"""The benchmark sweep: suite validation, combinations, conflicts, caching and resume."""

import json
from pathlib import Path

import pytest
import torch
from speedup.benchmarks.harness import Suite, configurations, load_suite

from speedup.config import ConfigError


def suite_from(tmp_path: Path, text: str) -> Suite:
    """The suite that ``text`` declares, loaded from a suite.yaml file in ``tmp_path``."""
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return load_suite(str(path))


BASE = """
workload: {recipe: quickstart, overrides: [data.num_train=256, data.num_test=64]}
target: {metric: accuracy, value: 0.2}
budget: 4ba
eval_interval: 2ba
seeds: [1]
timing: {steps: 2, repeats: 1, positions: [0.5]}
"""


def test_combinations_in_suite_order(tmp_path):
    suite = suite_from(
        tmp_path,
        BASE
        + """
algorithms: {label_smoothing: {}, magnitude_pruning: {sparsity: 0.5}, rewinding: {}}
combinations: [singles, pairs, full, [rewinding, magnitude_pruning]]
""",
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
        suite_from(tmp_path, BASE + extra)


def test_unknown_workload_and_metric_not_produced(tmp_path):
    with pytest.raises(ConfigError, match="workload.recipe: unknown recipe 'nope'"):
        suite_from(tmp_path, BASE.replace("quickstart", "nope"))
    text = BASE.replace("metric: accuracy", "metric: perplexity")
    with pytest.raises(ConfigError, match="'perplexity' is not produced.*accuracy, loss"):
        suite_from(tmp_path, text)
    with pytest.raises(ConfigError, match="unknown suite 'nope'"):
        load_suite("nope")


def test_sweep_runs_reports_conflicts_and_resumes(tmp_path, capsys):
    from speedup.benchmarks.harness import run_suite

    suite = suite_from(
        tmp_path,
        BASE
        + """
algorithms: {label_smoothing: {alpha: 0.1}, rewinding: {}}
combinations: [singles, pairs]
""",
    )
    out = tmp_path / "out"
    results = run_suite(suite, out, progress=False)
    assert set(results["conflicts"]) == {"rewinding", "label_smoothing+rewinding"}
    assert [r["config"] for r in results["runs"]] == ["baseline", "label_smoothing"]
    assert set(results["step_cost"]) == {"baseline", "label_smoothing"}
    [(fraction, cost)] = results["step_cost_profile"]["label_smoothing"]["points"]
    # 4-step run, 2-step window at 0.5: it starts at step 1, measures steps 2-3 (middle 3).
    assert fraction == pytest.approx(0.75) and cost > 0
    assert results["step_cost"]["label_smoothing"] == pytest.approx(cost)
    timing = json.loads((out / "timing.json").read_text())
    assert timing["timing_key"] == results["timing_key"]
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
    "name",
    [
        "shapes2d-named",
        "stdlib-gpt",
        "stdlib-gpt-speedrun",
        "resnet50-imagenet",
        "gpt2-c4",
        "bert-c4",
    ],
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
    suite = suite_from(tmp_path, text)
    serial = run_suite(suite, tmp_path / "serial", progress=False)
    parallel = run_suite(suite, tmp_path / "parallel", progress=False, parallel=2)
    assert [r["config"] for r in parallel["runs"]] == [r["config"] for r in serial["runs"]]
    assert not any(r["cached"] for r in parallel["runs"])
    for a, b in zip(serial["runs"], parallel["runs"]):
        assert a["final"] == pytest.approx(b["final"], rel=1e-6)  # same seeds, same runs
        assert b["curve"][-1]["flops"] == a["curve"][-1]["flops"]
    logs = sorted(p.name for p in (tmp_path / "parallel" / "requests").glob("*.log"))
    assert len(logs) == len(parallel["runs"]) == 2


PERIODIC = BASE + "algorithms: {label_smoothing: {alpha: 0.1}, sam: {interval: 10}}\n"


def test_timing_windows_alternate_abba_after_a_discarded_warmup_pair(tmp_path, monkeypatch):
    from speedup.benchmarks import harness

    text = PERIODIC.replace("positions: [0.5]", "positions: [0.25, 0.75]").replace(
        "repeats: 1", "repeats: 2"
    )
    suite = suite_from(tmp_path, text)
    base_hash = harness.config_hash(harness._config(suite, [], 1, tmp_path))
    calls = []
    # Planted window costs: baseline 2 s/step; label smoothing 3 at 25%, 5 at 75% of the run.
    planted = {0.25: 3.0, 0.75: 5.0}

    def fake_window(cfg, position, steps, period=1):
        arm = "B" if harness.config_hash(cfg) == base_hash else "C"
        calls.append((arm, position, period))
        cost = 2.0 if arm == "B" else planted[position]
        return cost, position, 100

    monkeypatch.setattr(harness, "time_window_detail", fake_window)
    timing = harness.measure_step_profiles(suite, [[], ["label_smoothing"], ["sam"]], tmp_path)
    arms = "".join(arm for arm, _, _ in calls)
    # Warm-up pair, then per configuration ABBA over positions x repeats.
    assert arms == "BC" + "BCCBBCCB" + "BCCBBCCB"
    profile = timing["step_cost_profile"]["label_smoothing"]
    assert profile["points"] == [[0.25, 1.5], [0.75, 2.5]]
    assert profile["samples"] == [[1.5, 1.5], [2.5, 2.5]]
    # Run average of the piecewise-linear profile: 1.5 to 25, linear to 2.5 at 75, flat after.
    assert timing["step_cost"]["label_smoothing"] == pytest.approx(
        (25 * 1.5 + 50 * 2.0 + 25 * 2.5) / 100
    )
    assert timing["baseline_step_time_s"] == 2.0
    # SAM every 10th step: its windows (and their baseline partners) span whole periods.
    assert {period for arm, _, period in calls[10:]} == {10}
    assert {period for arm, _, period in calls[2:10]} == {1}


@pytest.mark.parametrize(
    "algorithms, period, expected",
    [
        ("{sam: {interval: 10}, lookahead: {k: 4}}", None, 20),
        ("{ema: {half_life: 100ba, update_interval: 20ba}}", None, 20),
        ("{sam: {interval: 10}}", 3, 30),
        ("{label_smoothing: {}}", None, 1),
        ("{lookahead: {}}", None, 5),  # its default k
    ],
)
def test_window_period_spans_every_periodic_algorithm(tmp_path, algorithms, period, expected):
    from speedup.benchmarks.harness import window_period

    text = BASE + f"algorithms: {algorithms}\n"
    if period:
        text = text.replace("positions: [0.5]", f"positions: [0.5], period: {period}")
    suite = suite_from(tmp_path, text)
    assert window_period(suite, list(suite.algorithms)) == expected


@pytest.mark.parametrize(
    "timing, needle",
    [
        ("{stesp: 2}", "timing.stesp: unknown key"),
        ("{steps: 0}", "timing.steps: must be an integer >= 1"),
        ("{period: 2.5}", "timing.period: must be an integer >= 1"),
        ("{positions: [0.5, 1.5]}", "timing.positions: 1.5 is not a fraction"),
    ],
)
def test_timing_settings_are_validated(tmp_path, timing, needle):
    text = BASE.replace("timing: {steps: 2, repeats: 1, positions: [0.5]}", f"timing: {timing}")
    text += "algorithms: {label_smoothing: {}}\n"
    with pytest.raises(ConfigError, match=needle):
        suite_from(tmp_path, text)


def test_timing_json_of_another_suite_is_not_reused(tmp_path, monkeypatch, capsys):
    from speedup.benchmarks import harness

    measured = []

    def fake_profiles(suite, configs, out):
        measured.append(suite.algorithms["label_smoothing"]["alpha"])
        return {"baseline_step_time_s": 0.5, "step_cost": {"baseline": 1.0}}

    monkeypatch.setattr(harness, "measure_step_profiles", fake_profiles)
    out = tmp_path / "out"
    out.mkdir()
    configs = [[], ["label_smoothing"]]
    text = BASE + "algorithms: {label_smoothing: {alpha: 0.1}}\n"
    first = suite_from(tmp_path, text)
    timing = harness.load_or_measure_timing(first, configs, out)
    saved = json.loads((out / "timing.json").read_text())
    assert saved["timing_key"] == timing["timing_key"] == harness.timing_key(first, configs, out)
    assert harness.load_or_measure_timing(first, configs, out) == timing
    assert measured == [0.1]  # reused: same suite, same key
    # Another suite (a different argument) writing into the same directory: measured again.
    other = suite_from(tmp_path, text.replace("0.1", "0.2"))
    assert harness.timing_key(other, configs, out) != timing["timing_key"]
    harness.load_or_measure_timing(other, configs, out)
    assert measured == [0.1, 0.2]
    assert "measured for another suite" in capsys.readouterr().out
    # A timing.json from before the key existed is measured again too.
    (out / "timing.json").write_text(json.dumps({"baseline_step_time_s": 9.0}))
    assert harness.load_or_measure_timing(other, configs, out)["baseline_step_time_s"] == 0.5
    assert measured == [0.1, 0.2, 0.2]


def test_overhead_pairs_alternate_abba(monkeypatch):
    from speedup.benchmarks import overhead

    calls = []
    monkeypatch.setattr(overhead, "plain_loop", lambda net, loader, steps: calls.append("P") or 1.0)
    monkeypatch.setattr(
        overhead, "trainer_loop", lambda net, loader, steps, noops: calls.append("T") or 2.0
    )
    data = {"inputs": torch.zeros(8, 4), "targets": torch.zeros(8, dtype=torch.long)}
    plain, framework = overhead.compare(lambda: torch.nn.Linear(4, 2), data, 4, 1, 4, 0)
    assert "".join(calls) == "PT" + "TPPTTPPT"  # warm-up pair, then ABBA
    assert (plain, framework) == (1.0, 2.0)
