"""The tuning protocol on synthetic objectives: cost integration, pruning at budget fractions,
tuning-budget parity, the pre-registered target, resume, two workers, fresh-seed CIs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
from speedup.tuning.baseline import pre_register_target, registered_target, target_from_finals
from speedup.tuning.objective import integrate_step_cost, pruner_step
from speedup.tuning.study import (
    counted_trials,
    fail_interrupted,
    make_pruner,
    make_sampler,
    open_study,
    optimize_until,
)
from speedup.tuning.validate import check_fresh_seeds, judge

from speedup.config import ConfigError

# -- calibrated cost ------------------------------------------------------------------------


def _fine_sum_reference(profile: list[tuple[float, float]], total: int, steps: float) -> float:
    """A midpoint Riemann sum in 1/1000-step slices of the cost joined linearly between the
    measured points and held flat beyond them (written independently of the harness)."""
    points = sorted(profile)

    def cost(step: float) -> float:
        x = step / total
        if x <= points[0][0]:
            return points[0][1]
        for (x0, c0), (x1, c1) in zip(points, points[1:]):
            if x <= x1:
                return c0 + (c1 - c0) * (x - x0) / (x1 - x0)
        return points[-1][1]

    n = int(round(steps * 1000))
    width = steps / n if n else 0.0
    return sum(cost((k + 0.5) * width) * width for k in range(n))


@pytest.mark.parametrize("steps", [0, 37, 50, 80.5, 100])
def test_cost_integration_on_a_planted_schedule(steps: float) -> None:
    # Progressive-resizing-like: cheap early steps, dear late ones.
    profile = [(0.9, 4.0), (0.1, 1.0), (0.5, 2.0)]
    total = 100
    got = integrate_step_cost(profile, total, steps)
    assert got == pytest.approx(_fine_sum_reference(profile, total, steps), rel=1e-6)


def test_cost_integration_closed_form_and_miss() -> None:
    profile = [(0.25, 1.0), (0.75, 3.0)]  # 1 s/step to step 50, 1 -> 3 to step 150, then 3
    assert integrate_step_cost(profile, 200, 160) == pytest.approx(50 * 1.0 + 100 * 2.0 + 10 * 3.0)
    assert integrate_step_cost(profile, 200, None) == math.inf
    with pytest.raises(ValueError, match="empty"):
        integrate_step_cost([], 10, 5)


# -- pruning --------------------------------------------------------------------------------


def _curve_trial(study: optuna.Study, curve: dict[float, float]) -> optuna.trial.TrialState:
    """Report a synthetic curve (budget fraction -> badness) as the objective would; return
    how the trial ended."""
    trial = study.ask()
    for fraction, value in sorted(curve.items()):
        trial.report(value, pruner_step(fraction))
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return optuna.trial.TrialState.PRUNED
    study.tell(trial, min(curve.values()))
    return optuna.trial.TrialState.COMPLETE


def test_pruning_decisions_on_synthetic_curves() -> None:
    study = optuna.create_study(direction="minimize", pruner=make_pruner(first_rung=0.25))
    good = {0.1: 0.9, 0.25: 0.5, 0.5: 0.3, 1.0: 0.1}
    # Asynchronous successive halving promotes the top third at a rung (the best while
    # fewer than three are there): trials that improve on all before them run to the end.
    for shift in (0.02, 0.01, 0.0):
        state = _curve_trial(study, {f: v + shift for f, v in good.items()})
        assert state == optuna.trial.TrialState.COMPLETE
    # Far worse at the first rung (a quarter of its own budget): stopped there.
    bad = {0.1: 2.0, 0.25: 1.9, 0.5: 1.8, 1.0: 1.7}
    assert _curve_trial(study, bad) == optuna.trial.TrialState.PRUNED
    assert study.trials[-1].last_step == pruner_step(0.25)
    # A late starter: terrible before the first rung, best at it. Never pruned early.
    late = {0.1: 50.0, 0.2: 40.0, 0.25: 0.4, 0.5: 0.2, 1.0: 0.05}
    assert _curve_trial(study, late) == optuna.trial.TrialState.COMPLETE


def test_rungs_are_budget_fractions_not_steps() -> None:
    # A 40-step trial at step 10 and a 400-step trial at step 100 are at the same rung.
    assert pruner_step(10 / 40) == pruner_step(100 / 400) == 250
    assert pruner_step(1.3) == 1000 and pruner_step(-1) == 0


# -- parity, target -------------------------------------------------------------------------


def test_baseline_and_methods_get_the_same_number_of_trials() -> None:
    base = optuna.create_study(sampler=make_sampler(0, 2), pruner=make_pruner(0.25))
    methods = optuna.create_study(sampler=make_sampler(0, 2), pruner=make_pruner(0.25))
    calls = {"baseline": 0, "methods": 0}

    def baseline_objective(trial: optuna.Trial) -> float:
        calls["baseline"] += 1
        return (trial.suggest_float("lr", 1e-3, 1.0, log=True) - 0.1) ** 2

    def methods_objective(trial: optuna.Trial) -> float:
        calls["methods"] += 1
        lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
        if trial.suggest_categorical("use.a", [False, True]) and trial.suggest_categorical(
            "use.b", [False, True]
        ):  # a conflicting pair: refused, not counted
            trial.set_user_attr("infeasible", "a+b")
            raise optuna.TrialPruned()
        return (lr - 0.2) ** 2

    optimize_until(base, baseline_objective, 6, progress=False)
    optimize_until(methods, methods_objective, 6, progress=False)
    assert len(counted_trials(base)) == len(counted_trials(methods)) == 6
    assert calls["baseline"] == 6
    refused = [t for t in methods.trials if t.user_attrs.get("infeasible")]
    assert calls["methods"] == 6 + len(refused)


def test_target_is_the_median_and_pre_registered_once(tmp_path: Path) -> None:
    assert target_from_finals([0.90, 0.80, 0.95]) == 0.90
    assert target_from_finals([0.8, 0.9]) == pytest.approx(0.85)
    spec = f"sqlite:///{tmp_path / 'study.db'}"
    speed = open_study(spec, "baseline-speed", "minimize")
    methods = open_study(spec, "methods", "minimize")
    target = {"metric": "accuracy", "value": 0.9}
    pre_register_target([speed, methods], target)
    assert registered_target(open_study(spec, "methods", "minimize"))["value"] == 0.9
    pre_register_target([speed, methods], dict(target))  # the same again: fine (resume)
    with pytest.raises(RuntimeError, match="use a new --out"):
        pre_register_target([methods], {"metric": "accuracy", "value": 0.5})
    other = open_study(spec, "other", "minimize")
    other.enqueue_trial({"lr": 0.1})
    with pytest.raises(RuntimeError, match="no pre-registered target"):
        pre_register_target([other], target)


# -- resume, workers ------------------------------------------------------------------------


def test_an_interrupted_study_resumes_without_repeating_finished_trials(tmp_path: Path) -> None:
    spec = f"sqlite:///{tmp_path / 'study.db'}"
    seen: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -5, 5)
        seen.append(x)
        return x * x

    study = open_study(spec, "methods", "minimize", n_startup=2)
    optimize_until(study, objective, 3, progress=False)
    finished = [t.params["x"] for t in study.trials]
    cut = study.ask({"x": optuna.distributions.FloatDistribution(-5, 5)})  # then killed
    cut_x = cut.params["x"]
    seen.clear()

    study = open_study(spec, "methods", "minimize", n_startup=2)  # a new process resumes
    for params in fail_interrupted(study):
        study.enqueue_trial(params)
    optimize_until(study, objective, 5, progress=False)
    assert len(seen) == 2  # two more to reach five, nothing finished was trained again
    assert seen[0] == cut_x  # the interrupted configuration first
    assert not set(seen[1:]) & set(finished)
    assert len(counted_trials(study)) == 5
    assert study.trials[cut.number].state == optuna.trial.TrialState.FAIL


WORKER = textwrap.dedent(
    """
    import json, os, sys
    from speedup.tuning.study import open_study, optimize_until

    spec, log = sys.argv[1], sys.argv[2]
    study = open_study(spec, "methods", "minimize", seed=int(sys.argv[3]), n_startup=2)

    def objective(trial):
        x = trial.suggest_float("x", -5, 5)
        with open(log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "trial": trial.number, "x": x}) + "\\n")
        return x * x

    optimize_until(study, objective, 8, progress=False)
    """
)


def test_two_workers_on_one_storage_run_disjoint_trials(tmp_path: Path) -> None:
    spec = f"journal:{tmp_path / 'study.journal'}"
    open_study(spec, "methods", "minimize")  # created once, before the workers
    script, log = tmp_path / "worker.py", tmp_path / "calls.jsonl"
    script.write_text(WORKER)
    workers = [
        subprocess.Popen([sys.executable, str(script), spec, str(log), str(seed)])
        for seed in (1, 2)
    ]
    assert [w.wait(timeout=240) for w in workers] == [0, 0]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    by_pid: dict[int, set[int]] = {}
    for call in calls:
        by_pid.setdefault(call["pid"], set()).add(call["trial"])
    numbers = [c["trial"] for c in calls]
    assert len(numbers) == len(set(numbers))  # no trial was run twice
    if len(by_pid) == 2:  # both got work (the usual case); their trials are disjoint
        first, second = by_pid.values()
        assert not first & second
    study = open_study(spec, "methods", "minimize")
    # Each worker stops once eight count; one may finish the trial it had started.
    assert 8 <= len(counted_trials(study)) <= 9


# -- fresh-seed validation ------------------------------------------------------------------


def _reference_ratio_ci(base: list[float], config: list[float], n: int, seed: int) -> tuple:
    """Percentile bootstrap of mean(base)/mean(config), each arm resampled on its own, with
    order-statistic quantiles, written from the definition."""
    rng = np.random.default_rng(seed)
    b, c = np.asarray(base), np.asarray(config)
    bi = rng.integers(0, b.size, size=(n, b.size))
    ci = rng.integers(0, c.size, size=(n, c.size))
    ratios = sorted(b[bi[k]].mean() / c[ci[k]].mean() for k in range(n))
    alpha = (1 - 0.95) / 2  # the smallest resample whose empirical CDF reaches the level
    low = ratios[math.ceil(alpha * n) - 1]
    high = ratios[math.ceil((1 - alpha) * n) - 1]
    return b.mean() / c.mean(), low, high


def test_validation_ci_on_planted_data() -> None:
    base = [10.0, 11.0, 9.5, 10.5, 12.0]
    config = [5.0, 5.5, 4.8, 5.2, 6.1]
    row = judge(base, config, [0.9] * 5, n_resamples=1000, seed=3)
    point, low, high = _reference_ratio_ci(base, config, 1000, 3)
    assert row["speedup"]["point"] == pytest.approx(point)
    assert row["speedup"]["low"] == pytest.approx(low)
    assert row["speedup"]["high"] == pytest.approx(high)
    assert row["is_speedup"] and low > 1.0 and row["misses"] == 0


def test_a_lucky_or_missing_configuration_is_not_a_speedup() -> None:
    # Overlapping arms: the point estimate is above 1 but the CI reaches below it.
    noisy = judge([10, 10, 10, 10, 10], [6, 14, 7, 13, 8], [0.9] * 5)
    assert noisy["speedup"]["point"] > 1.0 and noisy["speedup"]["low"] < 1.0
    assert not noisy["is_speedup"]
    missed = judge([10] * 5, [5, 5, 5, 5, math.inf], [0.9, 0.9, 0.9, 0.9, 0.5])
    assert missed["misses"] == 1 and missed["speedup"]["point"] == 0.0
    assert not missed["is_speedup"]
    assert missed["final_mean"] == pytest.approx(0.82)


def test_validation_seeds_must_be_fresh_and_enough() -> None:
    with pytest.raises(ConfigError, match=r"--validate-seeds: \[2\] also searched"):
        check_fresh_seeds([0, 1, 2], [2, 10, 11, 12, 13])
    with pytest.raises(ConfigError, match="at least 5"):
        check_fresh_seeds([0], [10, 11])
    check_fresh_seeds([0], [10, 11], smoke=True)


def test_flops_speedup_censors_baseline_misses_and_needs_every_count() -> None:
    from speedup.tuning.validate import flops_speedup

    base, totals = [4e9, math.inf, 5e9, 4.5e9, 4e9], [6e9, 6e9, 6e9, 6e9, 6e9]
    config = [2e9, 2.2e9, 1.9e9, 2.1e9, 2e9]
    row = flops_speedup(base, totals, config, n_resamples=500, seed=1)
    censored = [4e9, 6e9, 5e9, 4.5e9, 4e9]  # the miss counts as its whole run
    point, low, high = _reference_ratio_ci(censored, config, 500, 1)
    assert row["point"] == pytest.approx(point) == pytest.approx(sum(censored) / sum(config))
    assert (row["low"], row["high"]) == (pytest.approx(low), pytest.approx(high))
    assert flops_speedup(base, totals, [*config[:4], None]) is None


def test_algorithm_effects_split_completed_methods_trials() -> None:
    from speedup.tuning.report import algorithm_effects

    def row(study: str, state: str, time: float, **use: bool) -> dict:
        params = {f"use.{k}": v for k, v in use.items()}
        return {"study": study, "state": state, "time_to_target_s": time, "params": params}

    rows = [
        row("methods", "COMPLETE", 10.0, ema=True, rotary=False),
        row("methods", "COMPLETE", 20.0, ema=True, rotary=True),
        row("methods", "COMPLETE", math.inf, ema=False, rotary=True),
        row("methods", "COMPLETE", 40.0, ema=False, rotary=False),
        row("methods", "PRUNED", 1.0, ema=True, rotary=True),  # not counted
        row("baseline-speed", "COMPLETE", 1.0),  # another study
    ]
    effects = algorithm_effects(rows)
    assert set(effects) == {"ema", "rotary"}
    assert effects["ema"]["on"] == {"trials": 2, "reached": 2, "median_time_s": 15.0}
    assert effects["ema"]["off"]["reached"] == 1 and effects["ema"]["off"]["trials"] == 2
    assert effects["ema"]["off"]["median_time_s"] == math.inf
    assert effects["rotary"]["off"]["median_time_s"] == 25.0


def test_the_target_setting_baseline_starts_the_speed_study_and_backs_the_yardstick(
    tmp_path: Path,
) -> None:
    from optuna.distributions import FloatDistribution
    from speedup.tuning.tune import TuneSettings, _study, fastest_baseline, seed_baseline_speed

    s = TuneSettings(recipe="quickstart", out=str(tmp_path), progress=False)
    quality = _study(s, "baseline-quality")
    for number, lr in enumerate([0.3, 0.02]):
        quality.add_trial(
            optuna.trial.create_trial(
                params={"lr": lr},
                distributions={"lr": FloatDistribution(1e-3, 1.0, log=True)},
                value=0.5 + number / 10,
            )
        )
    tuned_changes = {"optimizer.lr": 0.02, "scale_schedule_ratio": 1.0}
    target = {"value": 0.55, "tuned_baseline": {"trial": 1, "changes": tuned_changes}}
    assert seed_baseline_speed(s, target)
    speed = _study(s, "baseline-speed")
    (waiting,) = speed.get_trials(states=(optuna.trial.TrialState.WAITING,))
    fixed = waiting.system_attrs["fixed_params"]
    assert fixed == {"lr": 0.02, "budget": 1.0}  # the tuned LR at the full budget
    assert not seed_baseline_speed(s, target)  # once: a study with trials is left alone
    # No baseline trial reached the target: the yardstick is the target-setting baseline.
    speed.tell(speed.ask(), 40.0)
    assert fastest_baseline(speed, target) == {
        "study": "baseline-quality",
        "trial": 1,
        "changes": tuned_changes,
    }
    # The fastest baseline trial that reached it is the yardstick; a faster miss is not.
    for value, reached in ((12.0, True), (9.0, True), (8.0, False)):
        trial = speed.ask()
        trial.set_user_attr("time_to_target_s", value if reached else math.inf)
        trial.set_user_attr("changes", {"optimizer.lr": value})
        speed.tell(trial, value)
    best = fastest_baseline(speed, target)
    assert best["study"] == "baseline-speed" and best["changes"] == {"optimizer.lr": 9.0}


def test_incumbent_pruner_stops_only_trials_that_can_no_longer_be_fastest(
    tmp_path: Path,
) -> None:
    from speedup.tuning.study import IncumbentPruner

    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "methods", "minimize")
    assert isinstance(study.pruner, IncumbentPruner)
    pruner = IncumbentPruner(slack=1.5)

    def running(**attrs: object) -> optuna.trial.FrozenTrial:
        trial = study.ask()
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return next(t for t in study.get_trials() if t.number == trial.number)

    early = running(elapsed_s=100.0)
    assert not pruner.prune(study, early)  # no incumbent yet: nothing to be slower than
    done = study.ask()
    done.set_user_attr("raw_time_to_target_s", 10.0)
    study.tell(done, 10.0)
    missed = study.ask()
    missed.set_user_attr("raw_time_to_target_s", math.inf)
    study.tell(missed, 99.0)  # a miss is no incumbent
    assert not pruner.prune(study, running(elapsed_s=14.9))  # could still win: 14.9 < 1.5 x 10
    assert pruner.prune(study, running(elapsed_s=15.1))  # slower than the incumbent already
    assert not pruner.prune(study, running(elapsed_s=40.0, reached_target=True))  # its time is set
    # A short budget at an early fraction is not compared with a long one's metric.
    assert not pruner.prune(study, running(elapsed_s=2.0))
    assert isinstance(
        open_study(f"sqlite:///{tmp_path / 'q.db'}", "baseline-quality", "maximize").pruner,
        optuna.pruners.SuccessiveHalvingPruner,
    )
    with pytest.raises(ValueError, match="slack"):
        IncumbentPruner(0.5)


def test_parallel_workers_sample_differently_and_one_worker_reproducibly(tmp_path: Path) -> None:
    """Workers seeded alike would draw the same start-up configurations and collide on one
    run directory; worker 0 alone repeats its draws."""
    from speedup.tuning.tune import TuneSettings, _study

    def first_lr(out: Path, worker: int) -> float:
        s = TuneSettings(recipe="quickstart", out=str(out), parallel=2, progress=False)
        return _study(s, "methods", worker).ask().suggest_float("lr", 1e-3, 1.0, log=True)

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    draws = [first_lr(one, 0), first_lr(one, 1)]
    assert draws[0] != draws[1]
    assert first_lr(two, 0) == draws[0]  # a fresh study, worker 0: the same first draw
