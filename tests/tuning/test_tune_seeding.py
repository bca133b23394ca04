"""The tuner's evidence handling: baseline misses censored on fresh seeds, the methods study
seeded from a bench sweep (``--seed-from``), and ``--parallel`` through the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from speedup.tuning.seeding import bench_seeds
from speedup.tuning.space import Space
from speedup.tuning.validate import censor_baseline, judge

from speedup.cli import main
from speedup.config import ConfigError

# -- censored baseline misses ---------------------------------------------------------------


def test_a_baseline_miss_is_censored_at_its_run_time() -> None:
    assert censor_baseline([10.0, math.inf, 12.0], [20.0, 21.0, 22.0]) == [10.0, 21.0, 12.0]
    with pytest.raises(ValueError, match="one run time"):
        censor_baseline([1.0], [1.0, 2.0])


def test_censoring_turns_an_infinite_speedup_into_a_lower_bound() -> None:
    base = [10.0, math.inf, 10.0, 10.0, math.inf]
    run_times = [30.0] * 5
    config = [5.0] * 5
    uncensored = judge(base, config, [0.9] * 5)
    assert math.isinf(uncensored["speedup"]["point"])  # what the old protocol reported
    row = judge(base, config, [0.9] * 5, baseline_run_times=run_times)
    # mean(10, 30, 10, 10, 30) / 5 = 18 / 5, independently computed.
    assert row["speedup"]["point"] == pytest.approx(18.0 / 5.0)
    assert row["baseline_misses"] == 2 and row["baseline_censored"] is True
    assert row["is_speedup"] is True  # every resample is >= 10 / 5
    # A configuration's own miss stays infinite: its speedup is 0, never censored.
    lucky = judge(base, [5.0, 5.0, math.inf, 5.0, 5.0], [0.9] * 5, baseline_run_times=run_times)
    assert lucky["speedup"]["point"] == 0.0 and lucky["is_speedup"] is False


def test_censored_ci_on_planted_data_matches_a_direct_bootstrap() -> None:
    rng = np.random.default_rng(3)
    base = list(rng.uniform(90, 110, 6))
    base[2] = math.inf
    config = list(rng.uniform(40, 60, 6))
    run_times = [200.0] * 6
    row = judge(base, config, [0.5] * 6, baseline_run_times=run_times, n_resamples=4000)
    filled = np.array([200.0 if math.isinf(b) else b for b in base])
    assert row["speedup"]["point"] == pytest.approx(filled.mean() / np.mean(config))
    assert row["speedup"]["low"] < row["speedup"]["point"] < row["speedup"]["high"]


# -- seeding from a bench sweep -------------------------------------------------------------


def _bench_dir(tmp_path: Path) -> Path:
    """A planted `speedup bench` output: whitening 2.9x, whitening+flip 3.2x, TTA 0.98x."""
    out = tmp_path / "bench"
    out.mkdir()
    configs = {
        "baseline": {"speedup_calibrated": {"point": 1.0}},
        "whitening_init": {"speedup_calibrated": {"point": 2.9}},
        "whitening_init+alternating_flip": {"speedup_calibrated": {"point": 3.2}},
        "test_time_augmentation": {"speedup_calibrated": {"point": 0.98}},
        "mixup": {"speedup_calibrated": {"point": 5.0}},  # not in the space: dropped
    }
    (out / "analysis.json").write_text(json.dumps({"baseline": "baseline", "configs": configs}))
    algorithms = {"whitening_init": {"eps": 1e-3, "num_images": 3000}, "alternating_flip": {}}
    (out / "results.json").write_text(json.dumps({"algorithms": algorithms}))
    return out


def _space() -> Space:
    algorithms = {
        "whitening_init": {"eps": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "alternating_flip": {},
        "test_time_augmentation": {"level": {"type": "categorical", "choices": [1, 2]}},
    }
    return Space(algorithms, lr=(1e-3, 1e-1), budget=(0.25, 1.0))


def test_bench_seeds_rank_the_sweep_and_add_a_short_budget(tmp_path: Path) -> None:
    seeds = bench_seeds(_bench_dir(tmp_path), _space(), lr=0.005)
    uses = [{k for k, v in p.items() if k.startswith("use.") and v} for p in seeds]
    # Best first, each twice (full budget, then 1.25 / speedup); slower than baseline: none.
    assert uses == [
        {"use.whitening_init", "use.alternating_flip"},
        {"use.whitening_init", "use.alternating_flip"},
        {"use.whitening_init"},
        {"use.whitening_init"},
    ]
    assert [p["budget"] for p in seeds] == pytest.approx([1.0, 1.25 / 3.2, 1.0, 1.25 / 2.9])
    assert all(p["lr"] == 0.005 and p["use.test_time_augmentation"] is False for p in seeds)
    assert seeds[0]["whitening_init.eps"] == 1e-3  # declared and in range: kept
    assert "whitening_init.num_images" not in seeds[0]  # not a searched argument


def test_seed_from_a_missing_sweep_exits_2_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(ConfigError, match="analysis.json not found"):
        bench_seeds(tmp_path / "nowhere", _space(), lr=0.005)
    out = tmp_path / "tune"
    args = ["tune", "quickstart", "--smoke", "--out", str(out), "--seed-from", str(tmp_path)]
    assert main(args) == 2
    assert "--seed-from" in capsys.readouterr().err
    assert not (out / "runs").exists()


@pytest.mark.slow
def test_seeded_trials_run_first_and_parallel_workers_share_the_study(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--seed-from and --parallel 2 through the command line: the bench's best configuration
    is the methods study's first trial, and two worker processes fill one journal study
    with distinct trial numbers up to the trial count."""
    import optuna

    bench = tmp_path / "bench"
    bench.mkdir()
    configs = {"baseline": {}, "label_smoothing": {"speedup_calibrated": {"point": 1.5}}}
    (bench / "analysis.json").write_text(json.dumps({"baseline": "baseline", "configs": configs}))
    (bench / "results.json").write_text(json.dumps({"algorithms": {"label_smoothing": {}}}))
    out = tmp_path / "tune"
    args = ["tune", "quickstart", "--smoke", "--trials", "3", "--parallel", "2", "--out", str(out)]
    args += ["--seed-from", str(bench), "--algorithms", "label_smoothing", "ema"]
    assert main(args) == 0
    assert (out / "study.journal").exists() and not (out / "study.db").exists()
    from speedup.tuning.study import open_storage

    storage = open_storage(f"journal:{(out / 'study.journal').resolve()}")
    methods = optuna.load_study(study_name="methods", storage=storage)
    trials = sorted(methods.get_trials(deepcopy=False), key=lambda t: t.number)
    assert trials[0].params["use.label_smoothing"] is True
    assert trials[0].params["use.ema"] is False
    assert trials[0].user_attrs["seeded_from"] == str(bench)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) >= 3
    results = json.loads((out / "results.json").read_text())
    assert results["trial_counts"]["methods"] >= 3
