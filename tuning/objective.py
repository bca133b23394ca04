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

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from speedup.callback import Callback
from speedup.config import config_hash, with_changes

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

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
    """Seconds to train ``steps`` of a ``total_steps`` run whose cost per step is ``profile``
    ((fraction of the run, seconds per step) points): the harness's
    :func:`~speedup.benchmarks.analysis.integrated_cost` (piecewise linear between the
    points, held flat beyond them), the same clock ``speedup bench`` uses. None or inf (the
    target was missed) gives inf."""
    from speedup.benchmarks.analysis import integrated_cost

    return integrated_cost(profile, total_steps, steps)


def cost_key(cfg: DictConfig) -> str:
    """What the step cost depends on: the config less its LR, seed, budget and run dir."""
    plain = with_changes(cfg, seed=0, run_dir=None, scale_schedule_ratio=1.0)
    plain.optimizer.lr = 0.0
    return config_hash(plain)


def measure_profile(
    cfg: DictConfig, baseline_cfg: DictConfig, timing: dict[str, Any]
) -> tuple[list[tuple[float, float]], list[float]]:
    """Seconds per step at each of ``timing['positions']``: the configuration's median ratio to
    the baseline over ``timing['repeats']`` pairs of windows of ``timing['steps']`` steps, and
    the baseline window times measured on the way (for its median).

    The harness's timing method (:func:`speedup.benchmarks.harness.measure_step_profiles`):
    one discarded warm-up pair; pairs in ABBA order (even pairs run the baseline first, odd
    pairs the configuration first), so neither arm always gets the warmer cache; windows of
    whole periods of the configuration's recurring work (SAM, Lookahead, EMA intervals)."""
    from speedup.benchmarks.harness import algorithms_period, time_window

    steps, repeats = int(timing["steps"]), int(timing["repeats"])
    same = cost_key(cfg) == cost_key(baseline_cfg)
    period = algorithms_period(OmegaConf.to_container(cfg.algorithms, resolve=True))
    positions = [float(p) for p in timing["positions"]]
    time_window(baseline_cfg, positions[0], steps, period)  # warm-up pair, discarded
    if not same:
        time_window(cfg, positions[0], steps, period)
    ratios, base_times = [], []
    for position in positions:
        pairs = []
        for i in range(repeats):
            if same:
                b = c = time_window(baseline_cfg, position, steps, period)
            elif i % 2 == 0:
                b = time_window(baseline_cfg, position, steps, period)
                c = time_window(cfg, position, steps, period)
            else:
                c = time_window(cfg, position, steps, period)
                b = time_window(baseline_cfg, position, steps, period)
            base_times.append(b)
            pairs.append(c / b)
        ratios.append((position, statistics.median(pairs)))
    return ratios, base_times


class BudgetFractionReporter(Callback):
    """Reports each evaluation to an Optuna trial at its budget fraction; stops the run when
    the pruner says so. ``sign`` turns the metric into the study's direction (a study that
    minimises time-to-target is shown ``-accuracy``)."""

    def __init__(
        self,
        trial: Any,
        metric: str,
        sign: float,
        target: float | None = None,
        higher_is_better: bool = True,
    ) -> None:
        self.trial, self.metric, self.sign = trial, metric, sign
        self.target, self.higher_is_better = target, higher_is_better
        self.pruned_at: int | None = None

    def eval_end(self, state: State, logger: Logger) -> None:
        value = state.eval_metrics.get(self.metric)
        if value is None or self.trial is None:
            return
        step = pruner_step(state.elapsed_fraction)
        # What a time-to-target pruner needs: the training time so far, and the target's state.
        self.trial.set_user_attr("elapsed_s", float(state.timestamp.train_time_s))
        if self.target is not None:
            better = value >= self.target if self.higher_is_better else value <= self.target
            if better:
                self.trial.set_user_attr("reached_target", True)
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
    from speedup.benchmarks.harness import metric_curve

    curve = metric_curve(Path(run_dir), metric)
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
