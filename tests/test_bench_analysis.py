"""The sweep statistics: interpolated time-to-target, bootstrap CIs, interactions, Pareto."""

import math

import numpy as np
import pytest
from _helpers import sweep_results
from speedup.benchmarks.analysis import (
    analyze,
    bootstrap_ci,
    cost_draws,
    integrated_cost,
    interaction,
    pareto_frontier,
    period_mean,
    speedup,
    time_to_target,
)


def synthetic_results(crossings, finals, step_cost, seeds=(1, 2), conflicts=None):
    """A results.json payload; ``crossings[config]`` holds a crossing step per seed, on
    200-step curves (0.2 s and 1 GFLOP a step)."""
    return sweep_results(
        crossings,
        finals,
        step_cost,
        baseline_step_time_s=0.1,
        last=200,
        samples_per_step=128,
        seconds_per_step=0.2,
        flops_per_step=1e9,
        seeds=seeds,
        conflicts=conflicts,
    )


CROSSINGS = {
    "baseline": [80, 120],
    "a": [40, 60],
    "b": [50, 50],
    "a+b": [20, 20],
    "c": [None, None],
}
FINALS = {"baseline": 0.9, "a": 0.88, "b": 0.92, "a+b": 0.85, "c": 0.4}
STEP_COST = {"baseline": 1.0, "a": 0.5, "b": 1.0, "a+b": 0.5, "c": 1.2}


def test_time_to_target_interpolates_the_first_crossing():
    curve = [
        {"step": 10, "train_time_s": 1.0, "value": 0.2},
        {"step": 20, "train_time_s": 3.0, "value": 0.6},
        {"step": 30, "train_time_s": 4.0, "value": 0.4},  # dips back: the first crossing counts
        {"step": 40, "train_time_s": 5.0, "value": 0.9},
    ]
    # 0.5 lies 3/4 of the way from 0.2 to 0.6.
    assert time_to_target(curve, 0.5) == pytest.approx(2.5)
    assert time_to_target(curve, 0.5, x="step") == pytest.approx(17.5)
    assert time_to_target(curve, 0.95) is None
    # Exactly on an evaluation: that evaluation's x.
    assert time_to_target(curve, 0.6, x="step") == pytest.approx(20.0)


def test_time_to_target_first_point_already_there_and_lower_is_better():
    curve = [{"step": 10, "train_time_s": 2.0, "value": 0.8}, {"step": 20, "value": 0.9}]
    assert time_to_target(curve, 0.5) == 2.0  # no value known before it: its own x
    loss = [
        {"step": 10, "train_time_s": 1.0, "value": 3.0},
        {"step": 20, "train_time_s": 2.0, "value": 1.0},
    ]
    assert time_to_target(loss, 2.5, higher_is_better=False) == pytest.approx(1.25)
    assert time_to_target(loss, 0.5, higher_is_better=False) is None
    assert time_to_target([], 0.5) is None


def test_speedup_and_interaction_on_hand_values():
    assert speedup([100.0], [50.0]).point == pytest.approx(2.0)
    assert speedup([100.0], [80.0]).point == pytest.approx(1.25)
    assert speedup([100.0], [40.0]).point == pytest.approx(2.5)
    # 2.5 / (2 * 1.25) = 1: the pair is exactly the product of its singles.
    assert interaction([100.0], [50.0], [80.0], [40.0]) == (1.0, 1.0, 1.0)
    # A pair slower than the product: interference.
    assert interaction([100.0], [50.0], [80.0], [80.0]).point == pytest.approx(0.5)
    # Never reaching the target counts as infinite time: speedup 0.
    assert speedup([100.0, 100.0], [50.0, math.inf]).point == 0.0
    assert interaction([100.0], [50.0], [80.0], [math.inf]).point == 0.0
    assert math.isnan(interaction([100.0], [math.inf], [80.0], [40.0]).point)


def test_bootstrap_ci_single_values_and_bounds():
    one = bootstrap_ci([4.0], [2.0], lambda a, b: a.mean() / b.mean())
    assert one == (2.0, 2.0, 2.0)
    estimate = speedup([10.0, 11.0, 9.0, 10.5], [5.0, 5.5, 4.5, 5.2])
    assert estimate.low < estimate.point < estimate.high
    # Seeded: the same call gives the same interval.
    assert speedup([10.0, 11.0, 9.0, 10.5], [5.0, 5.5, 4.5, 5.2]) == estimate


def test_bootstrap_ci_covers_the_true_ratio_at_about_the_nominal_rate():
    rng = np.random.default_rng(123)
    true_ratio = 10.0 / 5.0
    covered = 0
    repetitions = 200
    for rep in range(repetitions):
        baseline = rng.normal(10.0, 2.0, size=20)
        config = rng.normal(5.0, 1.0, size=20)
        estimate = bootstrap_ci(
            baseline, config, lambda a, b: a.mean() / b.mean(), n_resamples=1000, seed=rep
        )
        covered += estimate.low <= true_ratio <= estimate.high
    assert 0.88 <= covered / repetitions <= 0.99


def test_pareto_frontier_on_a_planted_set():
    points = [
        (1.0, 0.50),  # 0 frontier: fastest
        (2.0, 0.90),  # 1 frontier
        (1.5, 0.40),  # 2 dominated by 0
        (3.0, 0.90),  # 3 dominated by 1 (same quality, slower)
        (2.5, 0.95),  # 4 frontier: best quality
        (4.0, 0.60),  # 5 dominated
        (2.0, 0.90),  # 6 duplicate of 1: neither strictly dominates
        (math.nan, 0.99),  # 7 left out
    ]
    assert pareto_frontier(points) == [0, 1, 6, 4]


def test_analyze_calibrated_times_speedups_and_interactions():
    results = synthetic_results(CROSSINGS, FINALS, STEP_COST)
    out = analyze(results)
    configs = out["configs"]
    assert list(configs) == ["baseline", "a", "b", "c", "a+b"]
    base = configs["baseline"]
    assert base["steps_to_target"]["values"] == pytest.approx([80.0, 120.0])
    # steps x relative step cost x baseline seconds per step (0.1).
    assert base["calibrated_time_to_target_s"]["mean"] == pytest.approx(10.0)
    assert configs["a"]["calibrated_time_to_target_s"]["values"] == pytest.approx([2.0, 3.0])
    assert configs["a+b"]["calibrated_time_to_target_s"]["mean"] == pytest.approx(1.0)
    # Raw wall-clock: 0.2 s per step for every config.
    assert base["time_to_target_s"]["mean"] == pytest.approx(20.0)
    assert configs["a"]["speedup_raw"]["point"] == pytest.approx(2.0)
    assert configs["a"]["speedup_calibrated"]["point"] == pytest.approx(4.0)
    assert configs["b"]["speedup_calibrated"]["point"] == pytest.approx(2.0)
    assert configs["a+b"]["speedup_calibrated"]["point"] == pytest.approx(10.0)
    low, high = (
        configs["a"]["speedup_calibrated"]["low"],
        configs["a"]["speedup_calibrated"]["high"],
    )
    assert low <= 4.0 <= high and low < high
    assert configs["a"]["flops_to_target"]["mean"] == pytest.approx(50e9)
    # Never reached: 0 of 2 seeds, infinite time, speedup 0.
    assert configs["c"]["reached"] == 0 and configs["c"]["reached_fraction"] == 0.0
    assert math.isinf(configs["c"]["calibrated_time_to_target_s"]["mean"])
    assert configs["c"]["speedup_calibrated"]["point"] == 0.0
    assert configs["b"]["final_quality"]["mean"] == pytest.approx(0.92)
    [pair] = out["interactions"]
    assert (pair["pair"], pair["a"], pair["b"]) == ("a+b", "a", "b")
    assert pair["interaction_calibrated"]["point"] == pytest.approx(10.0 / (4.0 * 2.0))
    # Pareto: calibrated time to target, or total calibrated time where the target was missed.
    points = {p["config"]: p for p in out["pareto"]["points"]}
    assert points["c"]["time_kind"] == "total_train_time"
    assert points["c"]["time_s"] == pytest.approx(200 * 1.2 * 0.1)
    assert out["pareto"]["frontier"] == ["a+b", "a", "b"]


def test_analyze_single_seed_missing_flops_and_lower_is_better():
    results = synthetic_results(
        {"baseline": [100], "a": [50]}, FINALS, {"baseline": 1.0}, seeds=(7,)
    )
    for run in results["runs"]:
        for point in run["curve"]:
            point["flops"] = None
    out = analyze(results)
    a = out["configs"]["a"]
    assert a["speedup_raw"] == {"point": 2.0, "low": 2.0, "high": 2.0}
    assert math.isnan(a["speedup_calibrated"]["point"])  # no step cost for "a"
    assert a["flops_to_target"] is None
    assert any("One seed" in note for note in out["notes"])
    assert any("No step cost for a" in note for note in out["notes"])
    assert out["interactions"] == []
    # A loss target: lower is better, and the Pareto frontier flips its quality axis.
    loss = synthetic_results(
        {"baseline": [100], "a": [50]}, FINALS, {"baseline": 1.0, "a": 1.0}, seeds=(7,)
    )
    loss["target"] = {"metric": "loss", "value": 0.5, "higher_is_better": False}
    for run in loss["runs"]:
        for point in run["curve"]:
            point["value"] = 1.0 - point["value"]  # falls through 0.5 at the same step
    out = analyze(loss)
    assert out["configs"]["a"]["speedup_calibrated"]["point"] == pytest.approx(2.0)
    assert out["configs"]["a"]["final_quality"]["mean"] == pytest.approx(0.12)
    # "a" is faster, the baseline ends at a lower loss (0.10 vs 0.12): both on the frontier.
    assert out["pareto"]["frontier"] == ["a", "baseline"]


# A planted progressive-resizing-like schedule: cost 0.25 early, 0.6 mid-run, 1.0 late,
# measured at 10%, 50% and 90% of a 100-step run.
PLANTED = [[0.1, 0.25], [0.5, 0.6], [0.9, 1.0]]


def test_cost_integration_on_a_planted_schedule():
    # By hand, piecewise linear between (10, 0.25), (50, 0.6), (90, 1.0), flat outside:
    # 0..10: 0.25 x 10 = 2.5; 10..50: (0.25 + 0.6) / 2 x 40 = 17; 50..70: c(70) = 0.8,
    # (0.6 + 0.8) / 2 x 20 = 14. Total 33.5.
    assert integrated_cost(PLANTED, 100, 70) == pytest.approx(33.5)
    # The whole run adds 70..90: (0.8 + 1.0) / 2 x 20 = 18 and 90..100: 10.
    assert integrated_cost(PLANTED, 100, 100) == pytest.approx(61.5)
    assert integrated_cost(PLANTED, 100, 5) == pytest.approx(1.25)  # before the first point
    assert integrated_cost(list(reversed(PLANTED)), 100, 70) == pytest.approx(33.5)
    assert integrated_cost([[0.5, 0.7]], 100, 40) == pytest.approx(28.0)  # constant: c x steps
    assert integrated_cost(PLANTED, 100, 0) == 0.0
    assert math.isinf(integrated_cost(PLANTED, 100, None))
    with pytest.raises(ValueError, match="empty"):
        integrated_cost([], 100, 10)


def test_analyze_integrates_the_profile_up_to_the_crossing():
    results = synthetic_results(
        {"baseline": [70, 70], "a": [70, 70]}, FINALS, {"baseline": 1.0, "a": 0.615}
    )
    for run in results["runs"]:
        run["steps"] = 100
    results["step_cost_profile"] = {"a": {"total_steps": 100, "points": PLANTED}}
    out = analyze(results)
    a = out["configs"]["a"]
    # 33.5 cost-steps to the crossing at step 70 x 0.1 s per baseline step; the whole-run
    # average (0.615 x 70 = 43.05 cost-steps) would overcharge the cheap early phase.
    assert a["calibrated_time_to_target_s"]["values"] == pytest.approx([3.35, 3.35])
    assert a["calibrated_train_time_s"]["mean"] == pytest.approx(6.15)
    assert a["speedup_calibrated"]["point"] == pytest.approx(70 / 33.5)
    # Without the profile the old whole-run average applies.
    del results["step_cost_profile"]
    flat = analyze(results)["configs"]["a"]
    assert flat["calibrated_time_to_target_s"]["mean"] == pytest.approx(0.615 * 70 * 0.1)


def test_period_mean_counts_a_periodic_cost_the_median_misses():
    # A step ten times dearer every 10th step (SAM at interval 10), three periods.
    durations = ([1.0] * 9 + [10.0]) * 3
    assert float(np.median(durations)) == 1.0  # the median never sees it
    assert period_mean(durations, 10) == pytest.approx(1.9)  # (9 x 1 + 10) / 10
    # A trailing partial period is dropped, not averaged in.
    assert period_mean(durations + [1.0] * 5, 10) == pytest.approx(1.9)
    # A load spike in one period moves only that period's mean: the median over periods holds.
    spiked = list(durations)
    spiked[3] = 50.0
    assert period_mean(spiked, 10) == pytest.approx(1.9)
    assert period_mean([3.0, 1.0, 2.0], 1) == 2.0  # period 1: the median step
    with pytest.raises(ValueError, match="no whole period"):
        period_mean([1.0] * 5, 10)


def test_cost_draws_resample_the_timing_pairs():
    profile = {"total_steps": 100, "points": [[0.5, 0.6]], "samples": [[0.5, 0.6, 0.9]]}
    draws = cost_draws(profile, 50, n_resamples=500, seed=3)
    # One point: each draw is the median of three resampled ratios over the measured median.
    assert draws.shape == (500,)
    assert set(np.round(draws, 12)) <= {round(r / 0.6, 12) for r in (0.5, 0.6, 0.9)}
    assert len(set(np.round(draws, 12))) == 3
    assert cost_draws({**profile, "samples": [[0.6]]}, 50) is None  # nothing to resample
    assert cost_draws(profile, math.inf) is None


def test_speedup_ci_carries_a_planted_cost_uncertainty():
    # One seed each: without factors the interval has zero width.
    assert speedup([10.0], [5.0]) == (2.0, 2.0, 2.0)
    factors = np.array([0.5, 2.0] * 1000)
    # Every resample is 10 / (5 x f): 4 or 1; the ends of the interval are those values.
    assert speedup([10.0], [5.0], config_factors=factors) == (2.0, 1.0, 4.0)
    with pytest.raises(ValueError, match="n_resamples"):
        speedup([10.0], [5.0], config_factors=np.ones(3))


def test_analyze_widens_the_calibrated_ci_with_the_timing_spread():
    results = synthetic_results(
        {"baseline": [70, 70, 70], "a": [70, 70, 70]}, FINALS, {"baseline": 1.0}, seeds=(1, 2, 3)
    )
    steady = {"total_steps": 200, "points": [[0.5, 0.5]], "samples": [[0.5, 0.5, 0.5]]}
    noisy = {"total_steps": 200, "points": [[0.5, 0.5]], "samples": [[0.3, 0.5, 0.8]]}
    results["step_cost_profile"] = {"a": steady}
    tight = analyze(results)["configs"]["a"]["speedup_calibrated"]
    results["step_cost_profile"] = {"a": noisy}
    wide = analyze(results)["configs"]["a"]["speedup_calibrated"]
    assert tight == {"point": 2.0, "low": 2.0, "high": 2.0}  # identical seeds, exact timing
    assert wide["point"] == pytest.approx(2.0)
    # The resampled medians are 0.3, 0.5 or 0.8: speedups 1/0.8 = 1.25 .. 1/0.3 = 3.33.
    assert wide["low"] == pytest.approx(1.25) and wide["high"] == pytest.approx(1 / 0.3)
