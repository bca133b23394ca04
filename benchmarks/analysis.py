"""Statistics of a composition sweep: time-to-target, speedups with CIs, interactions, Pareto.

Pure functions over plain data (numpy only; no scipy). The input is the ``results.json`` that
the sweep runner (``speedup.benchmarks.harness``) writes:

.. code-block:: text

    {
      "suite": "shapes2d-named",                 # suite name
      "workload": {"recipe": "shapes2d-baseline", "overrides": [...]},
      "target": {"metric": "accuracy", "value": 0.85, "higher_is_better": true},
      "seeds": [1, 2],                           # may be a single seed
      "environment": {...},                      # versions and hardware, shown as is
      "baseline_step_time_s": 0.123,             # median s/step of the baseline, timing phase
      "step_cost": {"baseline": 1.0, "a": 1.01, "a+b": 0.62},   # run-average relative cost
      "step_cost_profile": {                     # optional: cost along the run (see below)
        "a": {"total_steps": 780,                # the run's length the fractions refer to
              "points": [[0.12, 0.31], [0.52, 0.64], [0.92, 1.0]],   # (fraction, cost)
              "samples": [[0.3, 0.31, 0.33], ...]}},                 # pair ratios per point
      "conflicts": {"mixup+cutmix": "message"},  # refused by the engine: not run
      "runs": [
        {"config": "a+b",                        # "baseline", or names joined by "+"
         "algorithms": ["a", "b"],
         "seed": 1, "config_hash": "ab12cd34", "run_dir": "...", "cached": false,
         "curve": [{"step": 10, "epoch": 1, "sample": 1280, "train_time_s": 3.2,
                    "flops": 1.2e12, "value": 0.41}, ...],   # one point per evaluation
         "final": {"accuracy": 0.93, "loss": 0.2},
         "steps": 780, "train_time_s": 101.3, "eval_time_s": 6.1}
      ]
    }

``curve[i]["value"]`` is the target metric; ``flops`` may be null.

Conventions (AlgoPerf's, ``research/speed.md`` §9 items 4 and 12):

* **Time-to-target** is the *first* crossing of the target, linearly interpolated between the
  two evaluations around it. Raw time uses the measured ``train_time_s`` (eval excluded);
  **calibrated** time is ``baseline_step_time_s x`` the step cost *integrated* from step 0 to
  the crossing step: the step count is exact and hardware-independent, and the per-step costs
  come from an interleaved timing phase, so calibrated times are far less noisy than
  wall-clock on a shared host. The cost is measured at a few fractions of the run
  (``step_cost_profile``) and joined piecewise-linearly (held flat before the first and after
  the last point), so a schedule whose cost changes (progressive resizing from 0.25 to 1,
  batch-size or sequence-length warmup) is charged what it cost *up to the crossing*, not its
  whole-run average (:func:`integrated_cost`). Without a profile, ``steps x step_cost``.
* **The step-cost uncertainty is carried into the CIs**: each bootstrap resample also
  resamples the timing phase's pair ratios at every point of the profile (their median is the
  point's cost), so a configuration timed noisily gets a wider speedup interval.
* **A run that never reaches the target counts as infinite time.** A mean over seeds that
  includes one is infinite and its speedup is 0; the fraction of seeds reaching the target is
  reported next to it.
* **Speedup** = mean(baseline times) / mean(config times), with a percentile-bootstrap CI
  that resamples the seeds of each arm independently.
* **Interaction** of a pair = speedup(A+B) / (speedup(A) * speedup(B)): > 1 synergy, < 1
  interference (``research/speed.md`` §9 item 7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Estimate",
    "analyze",
    "bootstrap",
    "bootstrap_ci",
    "cost_draws",
    "integrated_cost",
    "interaction",
    "pareto_frontier",
    "period_mean",
    "speedup",
    "summarize",
    "time_to_target",
]

BASELINE = "baseline"


class Estimate(NamedTuple):
    """A point estimate and its confidence interval (``low``, ``high``)."""

    point: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"point": self.point, "low": self.low, "high": self.high}


def _reached(value: float, target: float, higher_is_better: bool) -> bool:
    return value >= target if higher_is_better else value <= target


def time_to_target(
    curve: Sequence[dict],
    target: float,
    higher_is_better: bool = True,
    x: str = "train_time_s",
) -> float | None:
    """The ``x`` (seconds, steps, samples, FLOPs) at which ``curve`` first reaches ``target``.

    The crossing is interpolated linearly between the last evaluation below the target and the
    first one reaching it. None if no evaluation reaches it. Points whose value is missing or
    NaN are skipped.

    If the very first evaluation already reaches the target there is nothing to interpolate
    from: the metric before it is unknown (we do not assume one at x = 0), so the first
    evaluation's ``x`` is returned. It is an upper bound on the true crossing; a harness that
    wants a tighter one evaluates at step 0.
    """
    previous = None
    for point in curve:
        value = point.get("value")
        if value is None or math.isnan(value):
            continue
        if _reached(value, target, higher_is_better):
            if point.get(x) is None:
                raise ValueError(f"curve point has no {x!r}: {point}")
            if previous is None:
                return float(point[x])
            x0, v0 = float(previous[x]), float(previous["value"])
            x1, v1 = float(point[x]), float(value)
            # v0 misses the target and v1 reaches it, so v1 != v0.
            return x0 + (target - v0) / (v1 - v0) * (x1 - x0)
        previous = point
    return None


def period_mean(durations: Sequence[float], period: int = 1) -> float:
    """The cost per step of a timing window that holds work recurring every ``period`` steps.

    The window is cut into whole periods (a trailing partial period is dropped, since it
    would over- or under-count the periodic step); each period's mean step time is taken and
    the result is the median over periods. A median over single steps would miss a step that
    is slow once per period (SAM's extra forward-backward every 10th step, a Lookahead sync):
    the mean over a whole period counts it exactly once per period, and the median across
    periods still ignores a period hit by a load spike. With ``period`` 1 this is the median
    of the steps.
    """
    if period < 1:
        raise ValueError(f"period must be a positive number of steps, got {period}")
    values = np.asarray(durations, dtype=float).ravel()
    whole = values.size // period
    if whole == 0:
        raise ValueError(f"a window of {values.size} steps holds no whole period of {period}")
    return float(np.median(values[: whole * period].reshape(whole, period).mean(axis=1)))


def integrated_cost(
    points: Sequence[Sequence[float]], total_steps: float, upto_step: float | None
) -> float:
    """Relative step cost summed over steps 0 .. ``upto_step`` of a ``total_steps`` run.

    ``points`` are (fraction of the run, relative cost per step) pairs measured in the timing
    phase. Between points the cost is joined linearly; before the first point and after the
    last it is held at that point's value. The integral of that piecewise-linear function over
    [0, upto_step] (in steps) is exact by the trapezoid rule on its breakpoints. A constant
    profile ``c`` gives ``c x upto_step``. None or inf (target not reached) gives inf.
    """
    if upto_step is None or math.isinf(upto_step):
        return math.inf
    if not points:
        raise ValueError("integrated_cost: empty step-cost profile")
    ordered = sorted((float(f), float(c)) for f, c in points)
    xs = np.array([f * float(total_steps) for f, _ in ordered])
    cs = np.array([c for _, c in ordered])
    end = float(upto_step)
    if end <= 0:
        return 0.0
    grid = np.unique(np.concatenate([[0.0, end], xs[(xs > 0) & (xs < end)]]))
    values = np.interp(grid, xs, cs)  # flat beyond the end points
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(grid)))


def cost_draws(
    profile: dict[str, Any],
    upto_step: float,
    n_resamples: int = 2000,
    seed: int = 0,
) -> np.ndarray | None:
    """Multiplicative bootstrap draws of a configuration's integrated step cost.

    ``profile["samples"][i]`` holds the timing phase's pair ratios (configuration / baseline)
    at ``profile["points"][i]``, whose cost is their median. Each draw resamples every point's
    ratios with replacement, takes their medians, integrates that profile to ``upto_step`` and
    divides by the integral of the measured profile: a factor near 1 whose spread is the
    step-cost uncertainty at that step. None when there is nothing to resample (no samples,
    or one ratio per point) or ``upto_step`` is not finite.
    """
    samples = profile.get("samples")
    points = profile.get("points")
    if not samples or not points or not math.isfinite(upto_step) or upto_step <= 0:
        return None
    if all(len(s) < 2 for s in samples):
        return None
    total = float(profile["total_steps"])
    base = integrated_cost(points, total, upto_step)
    if not base > 0:
        return None
    rng = np.random.default_rng(seed)
    fractions = [float(f) for f, _ in points]
    medians = []
    for ratios in samples:
        arr = np.asarray(ratios, dtype=float)
        picks = arr[rng.integers(0, arr.size, size=(n_resamples, arr.size))]
        medians.append(np.median(picks, axis=1))
    draws = np.empty(n_resamples)
    for r in range(n_resamples):
        resampled = [(f, m[r]) for f, m in zip(fractions, medians)]
        draws[r] = integrated_cost(resampled, total, upto_step) / base
    return draws


def bootstrap(
    samples: Sequence[Sequence[float]],
    statistic: Callable[..., Any],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    vectorized: bool = False,
    factors: Sequence[np.ndarray | None] | None = None,
) -> Estimate:
    """Percentile bootstrap of ``statistic(*samples)`` over independent samples.

    ``factors``, when given, holds per sample None or ``n_resamples`` multiplicative draws
    (e.g. :func:`cost_draws`): resample ``r`` of sample ``i`` is multiplied by
    ``factors[i][r]``, so an uncertainty that scales a whole arm (its measured step cost) is
    carried into the interval next to the spread across seeds.

    Each sample is resampled with replacement on its own. With ``vectorized`` the statistic is
    called once with arrays of shape (n_resamples, n_i) and must reduce the last axis;
    otherwise once per resample with 1-D arrays. The interval's ends are order statistics of
    the resampled statistics (no interpolation, so infinite values stay intact).

    When every sample holds a single value there is nothing to resample: the result is
    (point, point, point), an interval of zero width that says nothing about the spread.
    A single-value sample next to larger ones contributes no variance to the interval.
    """
    arrays = [np.asarray(s, dtype=float).ravel() for s in samples]
    if any(a.size == 0 for a in arrays):
        return Estimate(math.nan, math.nan, math.nan)
    factors = list(factors) if factors is not None else [None] * len(arrays)
    if len(factors) != len(arrays):
        raise ValueError(f"factors: {len(factors)} given for {len(arrays)} samples")
    for f in factors:
        if f is not None and np.shape(f) != (n_resamples,):
            raise ValueError(f"factors: each needs n_resamples={n_resamples} draws")
    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(statistic(*arrays))
        if all(a.size == 1 for a in arrays) and all(f is None for f in factors):
            return Estimate(point, point, point)
        rng = np.random.default_rng(seed)
        resampled = [a[rng.integers(0, a.size, size=(n_resamples, a.size))] for a in arrays]
        resampled = [
            r if f is None else r * np.asarray(f, dtype=float)[:, None]
            for r, f in zip(resampled, factors)
        ]
        if vectorized:
            stats = np.asarray(statistic(*resampled), dtype=float)
        else:
            stats = np.array(
                [float(statistic(*(r[i] for r in resampled))) for i in range(n_resamples)]
            )
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return Estimate(point, math.nan, math.nan)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha], method="inverted_cdf")
    return Estimate(point, float(low), float(high))


def bootstrap_ci(
    sample_a: Sequence[float],
    sample_b: Sequence[float],
    statistic: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Percentile-bootstrap CI of ``statistic(a, b)`` for two independent samples.

    With a single value per sample the result is (point, point, point): see :func:`bootstrap`.
    """
    return bootstrap([sample_a, sample_b], statistic, n_resamples, confidence, seed)


def _mean(x: np.ndarray) -> np.ndarray:
    return np.mean(x, axis=-1)


def _ratio_of_means(baseline: np.ndarray, config: np.ndarray) -> np.ndarray:
    # inf / finite = inf, finite / inf = 0 (a config that never reaches: speedup 0).
    return _mean(baseline) / _mean(config)


def speedup(
    baseline_times: Sequence[float],
    config_times: Sequence[float],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    config_factors: np.ndarray | None = None,
) -> Estimate:
    """mean(baseline) / mean(config) with a bootstrap CI; infinite times give speedup 0.

    ``config_factors``: multiplicative draws of the configuration's times (its step-cost
    uncertainty, :func:`cost_draws`), carried into the CI; see :func:`bootstrap`."""
    return bootstrap(
        [baseline_times, config_times],
        _ratio_of_means,
        n_resamples,
        confidence,
        seed,
        vectorized=True,
        factors=[None, config_factors],
    )


def _interaction(base: np.ndarray, a: np.ndarray, b: np.ndarray, ab: np.ndarray) -> np.ndarray:
    s_a, s_b, s_ab = _ratio_of_means(base, a), _ratio_of_means(base, b), _ratio_of_means(base, ab)
    product = s_a * s_b
    # A single that never reaches the target (speedup 0) leaves the interaction undefined.
    return np.where(product > 0, s_ab / np.where(product > 0, product, 1.0), np.nan)


def interaction(
    base: Sequence[float],
    a: Sequence[float],
    b: Sequence[float],
    ab: Sequence[float],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    factors: Sequence[np.ndarray | None] | None = None,
) -> Estimate:
    """speedup(ab) / (speedup(a) * speedup(b)) from four samples of times, with a bootstrap CI.

    > 1: the pair does better than the product of its singles (synergy); < 1: interference.
    NaN when a single never reaches the target; 0 when only the pair never reaches it.
    ``factors``: per sample, None or multiplicative draws (step-cost uncertainty).
    """
    return bootstrap(
        [base, a, b, ab],
        _interaction,
        n_resamples,
        confidence,
        seed,
        vectorized=True,
        factors=factors,
    )


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (time, quality) points no other point dominates, ordered by time.

    Lower time and higher quality are better; a point is dominated when another is at least as
    good on both and better on one, so exact duplicates both stay. Points with a NaN are left
    out.
    """
    valid = [i for i, (t, q) in enumerate(points) if not (math.isnan(t) or math.isnan(q))]
    frontier = []
    for i in valid:
        t_i, q_i = points[i]
        dominated = any(
            points[j][0] <= t_i
            and points[j][1] >= q_i
            and (points[j][0] < t_i or points[j][1] > q_i)
            for j in valid
            if j != i
        )
        if not dominated:
            frontier.append(i)
    return sorted(frontier, key=lambda i: (points[i][0], -points[i][1], i))


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, median, sample std (NaN below two values or with an infinity), min, max."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        nan = math.nan
        return {
            "n": 0,
            "mean": nan,
            "median": nan,
            "std": nan,
            "min": nan,
            "max": nan,
            "values": [],
        }
    finite = bool(np.all(np.isfinite(arr)))
    return {
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "std": float(arr.std(ddof=1)) if arr.size > 1 and finite else math.nan,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "values": [float(v) for v in arr],
    }


def _config_order(runs: list[dict]) -> list[str]:
    """Baseline first, then by number of algorithms, then by first appearance."""
    first: dict[str, tuple[int, int]] = {}
    for index, run in enumerate(runs):
        if run["config"] not in first:
            size = -1 if run["config"] == BASELINE else len(run.get("algorithms", []))
            first[run["config"]] = (size, index)
    return sorted(first, key=lambda c: first[c])


def _final_quality(run: dict, metric: str) -> float:
    final = run.get("final") or {}
    if final.get(metric) is not None:
        return float(final[metric])
    values = [p["value"] for p in run.get("curve", []) if p.get("value") is not None]
    return float(values[-1]) if values else math.nan


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else float(value)


def _profile(name: str, results: dict) -> dict | None:
    profile = (results.get("step_cost_profile") or {}).get(name)
    return profile if profile and profile.get("points") else None


def _calibrated_cost(
    name: str, results: dict, run_total: float | None, upto: float | None
) -> float:
    """Relative cost of steps 0 .. ``upto`` (no base seconds); NaN without a step cost."""
    if upto is None or math.isinf(upto):
        return math.inf
    profile = _profile(name, results)
    if profile is not None:
        total = profile.get("total_steps") or run_total
        return integrated_cost(profile["points"], float(total), upto)
    cost = (results.get("step_cost") or {}).get(name)
    return math.nan if cost is None else upto * float(cost)


def _analyze_config(name: str, runs: list[dict], results: dict) -> dict:
    target = results["target"]
    metric, goal = target["metric"], float(target["value"])
    higher = bool(target.get("higher_is_better", True))
    cost = (results.get("step_cost") or {}).get(name)
    base_step = results.get("baseline_step_time_s")
    calibrate = (cost is not None or _profile(name, results) is not None) and (
        base_step is not None
    )
    steps, seconds, calibrated, flops, totals = [], [], [], [], []
    for run in runs:
        curve = run.get("curve", [])
        step = _or_inf(time_to_target(curve, goal, higher, x="step"))
        steps.append(step)
        seconds.append(_or_inf(time_to_target(curve, goal, higher, x="train_time_s")))
        run_steps = run.get("steps")
        if calibrate:
            calibrated.append(_calibrated_cost(name, results, run_steps, step) * base_step)
        else:
            calibrated.append(math.nan)
        has_flops = curve and all(p.get("flops") is not None for p in curve)
        flops.append(_or_inf(time_to_target(curve, goal, higher, x="flops")) if has_flops else None)
        if calibrate and run_steps is not None:
            totals.append(_calibrated_cost(name, results, run_steps, run_steps) * base_step)
        else:
            totals.append(float(run.get("train_time_s", math.nan)))
    reached = sum(math.isfinite(s) for s in steps)
    finals = [_final_quality(run, metric) for run in runs]
    return {
        "algorithms": list(runs[0].get("algorithms", [])),
        "seeds": [run.get("seed") for run in runs],
        "reached": reached,
        "reached_fraction": reached / len(runs),
        "step_cost": cost,
        "steps_to_target": summarize(steps),
        "time_to_target_s": summarize(seconds),
        "calibrated_time_to_target_s": summarize(calibrated),
        "flops_to_target": summarize(flops) if all(f is not None for f in flops) else None,
        "final_quality": summarize(finals),
        "final": {
            key: summarize([run["final"][key] for run in runs])
            for key in sorted(runs[0].get("final") or {})
            if all(isinstance((run.get("final") or {}).get(key), int | float) for run in runs)
        },
        "train_time_s": summarize([float(run.get("train_time_s", math.nan)) for run in runs]),
        "calibrated_train_time_s": summarize(totals),
        "steps": summarize([float(run.get("steps", math.nan)) for run in runs]),
    }


def analyze(
    results: dict, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """Per-configuration statistics (seeds aggregated), pair interactions and the Pareto set.

    Returns ``{"target", "confidence", "baseline", "configs": {name: {...}}, "interactions":
    [...], "pareto": {"points": [...], "frontier": [names]}, "notes": [...]}``. Per config:
    fraction of seeds reaching the target, steps-, raw- and calibrated time-to-target
    (n/mean/median/std/min/max/values; inf where a seed missed), speedups over the baseline
    (``speedup_calibrated`` and ``speedup_raw``, each point/low/high), final quality (the target
    metric's final value), total train time. Bootstrap resampling is seeded, so the result
    is deterministic.
    """
    target = results["target"]
    higher = bool(target.get("higher_is_better", True))
    runs = results.get("runs", [])
    order = _config_order(runs)
    options = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    configs = {
        name: _analyze_config(name, [r for r in runs if r["config"] == name], results)
        for name in order
    }
    notes = [
        "A seed that never reaches the target counts as infinite time: a mean including it "
        "is infinite and its speedup 0 (AlgoPerf's convention).",
        "Calibrated time = relative step cost integrated from step 0 to the crossing x "
        f"baseline seconds per step ({results.get('baseline_step_time_s')}).",
    ]
    if results.get("step_cost_profile"):
        notes.append(
            "Step costs were measured at several fractions of the run and joined "
            "piecewise-linearly; their timing-phase spread is carried into the CIs."
        )
    seeds = results.get("seeds") or sorted({r.get("seed") for r in runs})
    if len(seeds) < 2:
        notes.append("One seed per configuration: confidence intervals have zero width.")
    base = configs.get(BASELINE)
    if base is None:
        notes.append("No baseline runs: speedups and interactions are undefined.")
    missing_cost = [
        n for n in order if configs[n]["step_cost"] is None and _profile(n, results) is None
    ]
    if missing_cost:
        notes.append(f"No step cost for {', '.join(missing_cost)}: calibrated times undefined.")

    def times(name: str, key: str) -> list[float]:
        return configs[name][key]["values"]

    # Step-cost uncertainty of each configuration, at its mean crossing step: multiplicative
    # draws applied to its calibrated times in every bootstrap resample. Each configuration
    # gets its own random stream so that the arms of an interaction stay independent.
    draws: dict[str, np.ndarray | None] = {}
    for index, name in enumerate(order):
        profile = _profile(name, results)
        reached_steps = [s for s in configs[name]["steps_to_target"]["values"] if math.isfinite(s)]
        if profile is None or not reached_steps:
            draws[name] = None
            continue
        upto = float(np.mean(reached_steps))
        draws[name] = cost_draws(profile, upto, n_resamples, seed=seed + 1 + index)

    for name, stats in configs.items():
        for kind, key in (
            ("calibrated", "calibrated_time_to_target_s"),
            ("raw", "time_to_target_s"),
        ):
            if base is None:
                estimate = Estimate(math.nan, math.nan, math.nan)
            else:
                factors = draws[name] if kind == "calibrated" else None
                estimate = speedup(
                    times(BASELINE, key), times(name, key), config_factors=factors, **options
                )
            stats[f"speedup_{kind}"] = estimate.as_dict()

    singles = {tuple(c["algorithms"]): n for n, c in configs.items() if len(c["algorithms"]) == 1}
    interactions = []
    for name, stats in configs.items():
        algorithms = stats["algorithms"]
        if base is None or len(algorithms) != 2:
            continue
        first, second = ((a,) for a in algorithms)
        if first not in singles or second not in singles:
            continue
        a, b = singles[first], singles[second]
        row: dict[str, Any] = {"pair": name, "a": a, "b": b}
        for kind, key in (
            ("calibrated", "calibrated_time_to_target_s"),
            ("raw", "time_to_target_s"),
        ):
            samples = [times(BASELINE, key), times(a, key), times(b, key), times(name, key)]
            factors = (
                [draws[BASELINE], draws[a], draws[b], draws[name]] if kind == "calibrated" else None
            )
            row[f"interaction_{kind}"] = interaction(*samples, factors=factors, **options).as_dict()
        row["speedup_a"] = configs[a]["speedup_calibrated"]["point"]
        row["speedup_b"] = configs[b]["speedup_calibrated"]["point"]
        row["speedup_ab"] = stats["speedup_calibrated"]["point"]
        interactions.append(row)

    points = []
    for name, stats in configs.items():
        reached_all = stats["reached"] == len(stats["seeds"])
        ttt = stats["calibrated_time_to_target_s"]["mean"]
        if math.isnan(ttt):
            ttt = stats["time_to_target_s"]["mean"]
        time_s = ttt if reached_all else stats["calibrated_train_time_s"]["mean"]
        points.append(
            {
                "config": name,
                "time_s": time_s,
                "time_kind": "time_to_target" if reached_all else "total_train_time",
                "quality": stats["final_quality"]["mean"],
            }
        )
    sign = 1.0 if higher else -1.0
    frontier = pareto_frontier([(p["time_s"], sign * p["quality"]) for p in points])
    return {
        "target": dict(target),
        "confidence": confidence,
        "baseline": BASELINE if base is not None else None,
        "configs": configs,
        "interactions": interactions,
        "pareto": {"points": points, "frontier": [points[i]["config"] for i in frontier]},
        "notes": notes,
    }
