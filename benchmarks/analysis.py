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
      "step_cost": {"baseline": 1.0, "a": 1.01, "a+b": 0.62},   # step cost relative to baseline
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
  **calibrated** time is ``steps_to_target x step_cost[config] x baseline_step_time_s``: the
  step count is exact and hardware-independent, and the per-step costs come from an
  interleaved timing phase, so calibrated times are far less noisy than wall-clock on a shared
  host. ``step_cost`` is a whole-run average, so for methods whose step cost changes during
  training (progressive resizing) the calibrated time is approximate when the target is
  reached mid-schedule.
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
    "interaction",
    "pareto_frontier",
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


def bootstrap(
    samples: Sequence[Sequence[float]],
    statistic: Callable[..., Any],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    vectorized: bool = False,
) -> Estimate:
    """Percentile bootstrap of ``statistic(*samples)`` over independent samples.

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
    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(statistic(*arrays))
        if all(a.size == 1 for a in arrays):
            return Estimate(point, point, point)
        rng = np.random.default_rng(seed)
        resampled = [a[rng.integers(0, a.size, size=(n_resamples, a.size))] for a in arrays]
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
) -> Estimate:
    """mean(baseline) / mean(config) with a bootstrap CI; infinite times give speedup 0."""
    return bootstrap(
        [baseline_times, config_times],
        _ratio_of_means,
        n_resamples,
        confidence,
        seed,
        vectorized=True,
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
) -> Estimate:
    """speedup(ab) / (speedup(a) * speedup(b)) from four samples of times, with a bootstrap CI.

    > 1: the pair does better than the product of its singles (synergy); < 1: interference.
    NaN when a single never reaches the target; 0 when only the pair never reaches it.
    """
    return bootstrap([base, a, b, ab], _interaction, n_resamples, confidence, seed, vectorized=True)


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


def _analyze_config(name: str, runs: list[dict], results: dict) -> dict:
    target = results["target"]
    metric, goal = target["metric"], float(target["value"])
    higher = bool(target.get("higher_is_better", True))
    cost = (results.get("step_cost") or {}).get(name)
    base_step = results.get("baseline_step_time_s")
    calibrate = cost is not None and base_step is not None
    steps, seconds, calibrated, flops, totals = [], [], [], [], []
    for run in runs:
        curve = run.get("curve", [])
        step = _or_inf(time_to_target(curve, goal, higher, x="step"))
        steps.append(step)
        seconds.append(_or_inf(time_to_target(curve, goal, higher, x="train_time_s")))
        calibrated.append(step * cost * base_step if calibrate else math.nan)
        has_flops = curve and all(p.get("flops") is not None for p in curve)
        flops.append(_or_inf(time_to_target(curve, goal, higher, x="flops")) if has_flops else None)
        run_steps = run.get("steps")
        if calibrate and run_steps is not None:
            totals.append(run_steps * cost * base_step)
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
        "Calibrated time = steps-to-target x relative step cost x baseline seconds per step "
        f"({results.get('baseline_step_time_s')}).",
    ]
    seeds = results.get("seeds") or sorted({r.get("seed") for r in runs})
    if len(seeds) < 2:
        notes.append("One seed per configuration: confidence intervals have zero width.")
    base = configs.get(BASELINE)
    if base is None:
        notes.append("No baseline runs: speedups and interactions are undefined.")
    missing_cost = [n for n in order if configs[n]["step_cost"] is None]
    if missing_cost:
        notes.append(f"No step cost for {', '.join(missing_cost)}: calibrated times undefined.")

    def times(name: str, key: str) -> list[float]:
        return configs[name][key]["values"]

    for name, stats in configs.items():
        for kind, key in (
            ("calibrated", "calibrated_time_to_target_s"),
            ("raw", "time_to_target_s"),
        ):
            if base is None:
                estimate = Estimate(math.nan, math.nan, math.nan)
            else:
                estimate = speedup(times(BASELINE, key), times(name, key), **options)
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
            row[f"interaction_{kind}"] = interaction(*samples, **options).as_dict()
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
