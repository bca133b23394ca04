"""One tuning trial: train a sampled configuration and measure its time-to-target.

The objective is **calibrated time-to-target**: the steps at which the run first reaches the
target (interpolated between evaluations, :func:`speedup.benchmarks.analysis.time_to_target`)
costed by the configuration's **step-cost profile** integrated over those steps. The profile
is measured in short timing windows at several points of the run (fractions), each against
the baseline in the same process, as ``speedup bench`` does; a method whose step cost
changes during training (progressive resizing, layer freezing) is charged what each part of
its schedule costs, not a whole-run average. Raw wall-clock and estimated FLOPs to target
are recorded beside it. A trial that misses the target counts as infinitely slow (AlgoPerf);
the sampler is given a finite penalty instead (``research/search-and-records.md``,
implication 7) so that it still learns from the miss.

For the pruner, each evaluation is reported at its **fraction of the trial's own budget**
(``step = round(1000 * fraction)``), so rungs compare trials at the same point of their own
schedule, never a short-budget trial's end against a long one's middle.
"""

from __future__ import annotations

import bisect
import math
import statistics
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from speedup.callback import Callback
from speedup.config import config_hash, with_changes

__all__ = [
    "BudgetFractionReporter",
    "Outcome",
    "cost_key",
    "integrate_step_cost",
    "outcome_of_run",
    "pruner_step",
    "train_trial",
]

#: Optuna steps per budget: an evaluation at 37% of a trial's budget is reported at step 370.
FRACTION_STEPS = 1000


def pruner_step(fraction: float) -> int:
    """The Optuna step of an evaluation at ``fraction`` of the trial's own budget."""
    return int(round(FRACTION_STEPS * min(max(fraction, 0.0), 1.0)))


def integrate_step_cost(
    profile: list[tuple[float, float]], total_steps: float, steps: float | None
) -> float:
    """Seconds to train ``steps`` of a ``total_steps`` run whose cost per step is ``profile``.

    ``profile`` holds (fraction of the run, seconds per step) measured at a few points; each
    point's cost holds from the midpoint with its left neighbour to the midpoint with its right
    one (the first from 0, the last to the end of the run). None (target missed) -> inf."""
    if steps is None or math.isinf(steps):
        return math.inf
    if not profile:
        raise ValueError("integrate_step_cost: empty step-cost profile")
    points = sorted(profile)
    fractions = [f for f, _ in points]
    edges = [0.0] + [(a + b) / 2 for a, b in zip(fractions, fractions[1:])] + [math.inf]
    done = steps / total_steps if total_steps else 0.0
    seconds = 0.0
    for (_, cost), start, end in zip(points, edges, edges[1:]):
        if done <= start:
            break
        seconds += (min(done, end) - start) * total_steps * cost
    return seconds


def cost_at(profile: list[tuple[float, float]], fraction: float) -> float:
    """The profile's cost per step at ``fraction`` (the nearest measured point)."""
    points = sorted(profile)
    fractions = [f for f, _ in points]
    i = bisect.bisect_left(fractions, fraction)
    candidates = [j for j in (i - 1, i) if 0 <= j < len(points)]
    return points[min(candidates, key=lambda j: abs(fractions[j] - fraction))][1]


def cost_key(cfg: DictConfig) -> str:
    """What the step cost depends on: the config less its LR, seed, budget and run dir."""
    plain = with_changes(cfg, seed=0, run_dir=None, scale_schedule_ratio=1.0)
    plain.optimizer.lr = 0.0
    return config_hash(plain)


def measure_profile(
    cfg: DictConfig, baseline_cfg: DictConfig, timing: dict[str, Any]
) -> tuple[list[tuple[float, float]], list[float]]:
    """Seconds per step at each of ``timing['positions']``: the configuration's median ratio to
    the baseline (windows alternating, ``timing['repeats']`` pairs of ``timing['steps']``
    steps), and the baseline window times measured on the way (for its median)."""
    from speedup.benchmarks.harness import _time_window

    steps, repeats = int(timing["steps"]), int(timing["repeats"])
    ratios, base_times = [], []
    for position in timing["positions"]:
        pairs = []
        for _ in range(repeats):
            b = _time_window(baseline_cfg, position, steps)
            c = b if cost_key(cfg) == cost_key(baseline_cfg) else _time_window(cfg, position, steps)
            base_times.append(b)
            pairs.append(c / b)
        ratios.append((float(position), statistics.median(pairs)))
    return ratios, base_times


class BudgetFractionReporter(Callback):
    """Reports each evaluation to an Optuna trial at its budget fraction; stops the run when
    the pruner says so. ``sign`` turns the metric into the study's direction (a study that
    minimises time-to-target is shown ``-accuracy``)."""

    def __init__(self, trial: Any, metric: str, sign: float) -> None:
        self.trial, self.metric, self.sign = trial, metric, sign
        self.pruned_at: int | None = None

    def eval_end(self, state, logger) -> None:  # noqa: ANN001
        value = state.eval_metrics.get(self.metric)
        if value is None or self.trial is None:
            return
        step = pruner_step(state.elapsed_fraction)
        self.trial.report(self.sign * float(value), step)
        if step < FRACTION_STEPS and self.trial.should_prune():
            self.pruned_at = step
            state.stop_training("pruned by the tuner")


class Outcome(dict):
    """A trial's measurements: ``final`` (target metric at the end), ``steps_to_target``,
    ``time_to_target_s`` (calibrated), ``raw_time_to_target_s``, ``flops_to_target``,
    ``steps``, ``run_dir``; times are inf when the target was missed."""


def outcome_of_run(
    run_dir: Path,
    summary: dict[str, Any],
    metric: str,
    target: float | None,
    higher_is_better: bool,
    profile: list[tuple[float, float]] | None,
) -> Outcome:
    """Time-to-target and final quality of a finished run, from its ``metrics.jsonl``."""
    from speedup.benchmarks.analysis import time_to_target
    from speedup.benchmarks.harness import _curve

    curve = _curve(Path(run_dir), metric)
    final = summary["metrics"].get(metric, math.nan)
    out = Outcome(final=float(final), steps=summary["steps"], run_dir=str(run_dir), curve=curve)
    if target is None:
        return out
    steps = time_to_target(curve, target, higher_is_better, x="step")
    raw = time_to_target(curve, target, higher_is_better)
    has_flops = curve and all("flops" in p for p in curve)
    flops = time_to_target(curve, target, higher_is_better, x="flops") if has_flops else None
    out.update(
        steps_to_target=math.inf if steps is None else steps,
        raw_time_to_target_s=math.inf if raw is None else raw,
        flops_to_target=math.inf if flops is None and has_flops else flops,
        time_to_target_s=(
            integrate_step_cost(profile, summary["steps"], steps) if profile else None
        ),
    )
    return out


def train_trial(
    cfg: DictConfig,
    run_dir: Path,
    reporter: BudgetFractionReporter | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (a finished one is reused), counting FLOPs."""
    from speedup.benchmarks.harness import FlopsMeter

    from speedup.run import run_config

    cfg = with_changes(cfg, run_dir=str(run_dir), progress_bar=False)
    extra = [FlopsMeter(), *([reporter] if reporter is not None else [])]
    return run_config(cfg, extra_callbacks=extra)
