"""Proof on fresh seeds: a configuration is a speedup only if its CI says so.

The best configurations of the search are re-run on seeds the search never used, next to
the fastest tuned baseline on the same seeds. The speedup is mean(baseline time) / mean(config
time) with a percentile-bootstrap CI over seeds (the harness's
:func:`speedup.benchmarks.analysis.speedup`; a miss is an infinite time, so one miss in a
configuration's seeds makes its mean infinite and its speedup 0). Only a configuration whose
CI lower bound is above 1 is called a speedup (``research/search-and-records.md``,
implication 11).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from speedup.errors import ConfigError

__all__ = [
    "MIN_VALIDATION_SEEDS",
    "censor_baseline",
    "check_fresh_seeds",
    "flops_speedup",
    "judge",
]

#: The issue asks for at least 5 fresh seeds (smoke runs may use fewer).
MIN_VALIDATION_SEEDS = 5


def check_fresh_seeds(search: Sequence[int], fresh: Sequence[int], smoke: bool = False) -> None:
    """ConfigError unless ``fresh`` is disjoint from ``search`` and large enough."""
    reused = sorted(set(search) & set(fresh))
    if reused:
        raise ConfigError(
            f"--validate-seeds: {reused} also searched (--seeds {list(search)}); validation "
            "needs seeds the search never used"
        )
    if len(set(fresh)) != len(fresh):
        raise ConfigError(f"--validate-seeds: repeated seeds in {list(fresh)}")
    if not smoke and len(fresh) < MIN_VALIDATION_SEEDS:
        raise ConfigError(
            f"--validate-seeds: needs at least {MIN_VALIDATION_SEEDS} seeds, got {len(fresh)}"
        )


def censor_baseline(times: Sequence[float], run_times: Sequence[float]) -> list[float]:
    """The baseline's times with each miss replaced by the calibrated time of its whole run.

    The target is the median final quality of the tuned full-budget baseline, so the fastest
    baseline misses it on some fresh seeds by construction. Counting such a miss as an
    infinite time would make every configuration infinitely faster on that seed; counting it
    as the time the run took without reaching the target is a lower bound on the baseline's
    time-to-target (right-censored), so the speedup computed from it can only understate."""
    if len(times) != len(run_times):
        raise ValueError("censor_baseline: one run time per baseline time")
    return [r if math.isinf(t) else t for t, r in zip(times, run_times)]


def judge(
    baseline_times: Sequence[float],
    config_times: Sequence[float],
    config_finals: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    baseline_run_times: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The validated row of one configuration: speedup with its CI, misses, final quality,
    and ``is_speedup`` (CI lower bound > 1).

    ``baseline_run_times`` (the calibrated time of each baseline run to its end): baseline
    misses are censored there (:func:`censor_baseline`) instead of counting as infinite; a
    configuration's miss stays infinite (its mean, and so its speedup, becomes 0)."""
    from speedup.benchmarks.analysis import speedup

    base = list(baseline_times)
    if baseline_run_times is not None:
        base = censor_baseline(base, baseline_run_times)
    estimate = speedup(base, config_times, n_resamples, confidence, seed)
    finite_finals = [f for f in config_finals if not math.isnan(f)]
    return {
        "speedup": estimate.as_dict(),
        "is_speedup": bool(estimate.low > 1.0),
        "misses": sum(math.isinf(t) for t in config_times),
        "baseline_misses": sum(math.isinf(t) for t in baseline_times),
        "baseline_censored": baseline_run_times is not None
        and any(math.isinf(t) for t in baseline_times),
        "seeds": len(config_times),
        "final_mean": (sum(finite_finals) / len(finite_finals)) if finite_finals else math.nan,
    }


def flops_speedup(
    baseline_flops: Sequence[float | None],
    baseline_run_flops: Sequence[float | None],
    config_flops: Sequence[float | None],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any] | None:
    """The speedup in estimated training FLOPs to the target, with its bootstrap CI, judged
    like the time (baseline misses censored at the run's total FLOPs); None when a run
    counted no FLOPs."""
    from speedup.benchmarks.analysis import speedup

    if any(v is None for v in (*baseline_flops, *baseline_run_flops, *config_flops)):
        return None
    base = censor_baseline(baseline_flops, baseline_run_flops)
    return speedup(base, list(config_flops), n_resamples, confidence, seed).as_dict()
