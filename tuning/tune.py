"""``speedup tune``: the protocol, phase by phase (docs/tuning.md).

1. ``baseline-quality``: the recipe without algorithms, full budget, LR searched for final
   quality; the best is re-run on the search seeds and the target is pre-registered.
2. The baseline's step time is measured once; every calibrated time is costed from it.
3. ``baseline-speed`` and ``methods``: the same number of trials each, time-to-target.
4. The best method configurations and the fastest baseline are re-run on fresh seeds.
5. results.json, the winning recipe (YAML with provenance) and report.md.

Everything lives in the output directory (the study storage, every run directory named by
its config hash), so the same command resumes an interrupted tune where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from speedup.tuning.baseline import pre_register_target, registered_target, target_from_finals
from speedup.tuning.objective import (
    BudgetFractionReporter,
    cost_key,
    integrate_step_cost,
    measure_profile,
    outcome_of_run,
    train_trial,
)
from speedup.tuning.space import Space, suggest
from speedup.tuning.study import (
    counted_trials,
    fail_interrupted,
    finite_or,
    open_study,
    optimize_until,
    storage_spec,
)

from speedup.config import config_hash, load_config, with_changes
from speedup.errors import ConfigError, Infeasible

__all__ = ["TuneSettings", "run_phase", "tune"]

#: Under ``--smoke``: short runs with a few evaluations (a time-to-target needs a curve).
SMOKE_OVERRIDES = [
    "max_duration=24ba",
    "eval_interval=6ba",
    "data.batch_size=32",
    "data.train_samples=384",
    "data.eval_samples=256",
    "threads=1",
]
SMOKE_TIMING = {"steps": 2, "repeats": 1, "positions": [0.5]}


@dataclass
class TuneSettings:
    """The command line of ``speedup tune``, as data (picklable for worker processes)."""

    recipe: str
    out: str
    overrides: list[str] = field(default_factory=list)
    smoke: bool = False
    metric: str = "accuracy"
    target_value: float | None = None
    trials: int = 20
    parallel: int = 1
    storage: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    validate_seeds: list[int] = field(default_factory=lambda: [100, 101, 102, 103, 104])
    algorithms: list[str] | None = None
    budget_low: float = 0.25
    top_k: int = 2
    timing: dict[str, Any] = field(
        default_factory=lambda: {"steps": 8, "repeats": 3, "positions": [0.1, 0.5, 0.9]}
    )
    sampler_seed: int = 0
    progress: bool = True
    #: A finished ``speedup bench`` output directory whose best configurations are the
    #: methods study's first trials (:mod:`speedup.tuning.seeding`).
    seed_from: str | None = None

    @property
    def higher_is_better(self) -> bool:
        from speedup.callbacks import lower_is_better

        return not lower_is_better(self.metric)

    def workload(self) -> DictConfig:
        extra = SMOKE_OVERRIDES if self.smoke else []
        cfg = load_config(self.recipe, [*extra, *self.overrides], smoke=self.smoke)
        # Trials keep one checkpoint (resume), and never a progress bar each.
        return with_changes(cfg, progress_bar=False, **{"checkpoint.keep_last": 1})


def check_settings(s: TuneSettings) -> None:
    """Bad command lines fail here, before anything trains (exit 2)."""
    from speedup.tuning.validate import check_fresh_seeds

    if s.trials < 1:
        raise ConfigError(f"--trials: must be >= 1, got {s.trials}")
    if s.parallel < 1:
        raise ConfigError(f"--parallel: must be >= 1, got {s.parallel}")
    if not s.seeds:
        raise ConfigError("--seeds: needs at least one seed")
    if not 0.0 < s.budget_low <= 1.0:
        raise ConfigError(f"--min-budget: must be in (0, 1], got {s.budget_low}")
    check_fresh_seeds(s.seeds, s.validate_seeds, smoke=s.smoke)


# -- one phase's trials ---------------------------------------------------------------------


def _space(s: TuneSettings, cfg: DictConfig, phase: str) -> Space:
    full = Space.for_workload(cfg, s.algorithms, budget=(s.budget_low, 1.0))
    if phase == "baseline-quality":
        return Space({}, full.lr, (1.0, 1.0))
    return full.baseline() if phase == "baseline-speed" else full


def _direction(s: TuneSettings, phase: str) -> str:
    if phase == "baseline-quality":
        return "maximize" if s.higher_is_better else "minimize"
    return "minimize"


def _study(s: TuneSettings, phase: str, worker: int = 0) -> optuna.Study:
    """The study of ``phase`` as ``worker`` samples it. Each worker's sampler has its own
    seed: workers seeded alike draw the same random start-up configurations, train the same
    run directory at once and collide on its lock. Workers on other machines (``--storage``)
    each start from worker 0, so their process id is mixed in; one local worker keeps
    ``sampler_seed`` exactly (a reproducible search)."""
    spec = storage_spec(Path(s.out), s.storage, s.parallel)
    n_startup = max(2, min(10, s.trials // 3))
    seed = s.sampler_seed + worker + (os.getpid() if s.storage else 0)
    return open_study(spec, phase, _direction(s, phase), seed, n_startup)


def _profile(study: optuna.Study, cfg: DictConfig, base: DictConfig, s: TuneSettings) -> list:
    """The configuration's step-cost profile (seconds per step by run fraction), measured once
    per distinct step-cost configuration and kept in the study (shared by workers)."""
    step_s = study.user_attrs["baseline_step_s"]
    key = f"cost:{cost_key(cfg)}"
    if key not in study.user_attrs:
        if cost_key(cfg) == cost_key(base):
            ratios = [(float(p), 1.0) for p in s.timing["positions"]]
        else:
            ratios, _ = measure_profile(cfg, base, s.timing)
        study.set_user_attr(key, ratios)
    return [(f, r * step_s) for f, r in study.user_attrs[key]]


def make_objective(s: TuneSettings, phase: str, study: optuna.Study):  # noqa: ANN201
    """The Optuna objective of ``phase``: final quality (baseline-quality) or calibrated
    time-to-target with misses as the study's finite penalty."""
    cfg = s.workload()
    space = _space(s, cfg, phase)
    quality = phase == "baseline-quality"
    sign = 1.0 if s.higher_is_better == (_direction(s, phase) == "maximize") else -1.0
    target = registered_target(study)

    def objective(trial: optuna.Trial) -> float:
        try:
            changes = suggest(trial, space, cfg)
        except Infeasible as err:  # never trained; does not count towards the budget
            trial.set_user_attr("infeasible", str(err)[:500])
            raise optuna.TrialPruned(f"infeasible: {err}") from None
        tcfg = with_changes(cfg, seed=s.seeds[0], **changes)
        run_dir = Path(s.out) / "runs" / f"{phase}-{config_hash(tcfg)}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("changes", json.loads(json.dumps(changes, default=str)))
        value = None if target is None else target["value"]
        reporter = BudgetFractionReporter(trial, s.metric, sign, value, s.higher_is_better)
        try:
            summary = train_trial(tcfg, run_dir, reporter)
        except ConfigError as err:  # refused before training (checked at AFTER_LOAD)
            trial.set_user_attr("infeasible", str(err)[:500])
            raise optuna.TrialPruned(f"infeasible: {err}") from None
        _check_metric(summary, s.metric)
        profile = None if quality else _profile(study, tcfg, cfg, s)
        outcome = outcome_of_run(run_dir, summary, s.metric, value, s.higher_is_better, profile)
        for key in ("final", "steps", "steps_to_target", "time_to_target_s"):
            if key in outcome:
                trial.set_user_attr(key, outcome[key])
        for key in ("raw_time_to_target_s", "flops_to_target"):
            if outcome.get(key) is not None:
                trial.set_user_attr(key, outcome[key])
        if reporter.pruned_at is not None:
            # A stopped run must not pass for a finished one if this config is drawn again.
            (run_dir / "summary.json").unlink(missing_ok=True)
            raise optuna.TrialPruned(f"pruned at {reporter.pruned_at / 1000:.0%} of its budget")
        if quality:
            return outcome["final"]
        return finite_or(outcome["time_to_target_s"], study.user_attrs["miss_penalty_s"])

    return objective


def _check_metric(summary: dict[str, Any], metric: str) -> None:
    if summary.get("preempted"):  # SIGTERM/SIGINT: stop the tune; the same command resumes
        raise KeyboardInterrupt(f"run stopped by {summary['preempted']}")
    if metric not in summary["metrics"]:
        raise ConfigError(
            f"--target: the workload reports no metric {metric!r}; it reports: "
            f"{', '.join(sorted(summary['metrics']))}"
        )


def run_phase(s: TuneSettings, phase: str, n_trials: int, worker: int = 0) -> None:
    """Run ``phase`` until ``n_trials`` count, in this process (a worker calls this too)."""
    study = _study(s, phase, worker)
    optimize_until(study, make_objective(s, phase, study), n_trials, phase, s.progress)


def _run_phase_parallel(s: TuneSettings, phase: str) -> optuna.Study:
    study = _study(s, phase)
    if s.storage is None:  # a local study has one owner (the lock): RUNNING means interrupted
        for params in fail_interrupted(study):  # run what the interruption cut short again
            study.enqueue_trial(params, skip_if_exists=True)
    if s.parallel == 1:
        run_phase(s, phase, s.trials)
    else:  # K local processes on one journal storage; each stops when the count is reached
        with ProcessPoolExecutor(s.parallel, mp_context=get_context("spawn")) as pool:
            jobs = [pool.submit(run_phase, s, phase, s.trials, w) for w in range(s.parallel)]
            for job in jobs:
                job.result()
    return _study(s, phase)


# -- the protocol ---------------------------------------------------------------------------


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial:
    complete = [t for t in counted_trials(study) if t.state.name == "COMPLETE"]
    if not complete:
        raise RuntimeError(f"study {study.study_name!r}: no trial completed")
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(complete, key=lambda t: t.value)


def _run_seeds(
    s: TuneSettings, cfg: DictConfig, changes: dict, seeds: list[int], tag: str, profile: Any
) -> list[dict[str, Any]]:
    """``cfg`` + ``changes`` trained on each seed (finished runs are reused)."""
    outcomes = []
    target = None if profile is None else s.target_value
    for seed in seeds:
        tcfg = with_changes(cfg, seed=seed, **changes)
        run_dir = Path(s.out) / "runs" / f"{tag}-{config_hash(tcfg)}"
        summary = train_trial(tcfg, run_dir)
        _check_metric(summary, s.metric)
        outcome = outcome_of_run(run_dir, summary, s.metric, target, s.higher_is_better, profile)
        curve = outcome.pop("curve")
        if curve and "flops" in curve[-1]:  # the whole run's FLOPs (a miss is censored there)
            outcome["run_flops"] = float(curve[-1]["flops"])
        if profile is not None:  # the whole run's calibrated time (a miss is censored there)
            outcome["run_time_s"] = integrate_step_cost(profile, outcome["steps"], outcome["steps"])
        outcomes.append({"seed": seed, **outcome})
    return outcomes


def seed_baseline_speed(s: TuneSettings, target: dict[str, Any]) -> bool:
    """Enqueue the configuration that set the target (the tuned baseline, at the full budget)
    as the baseline-speed study's first trial, once (a study with trials is left as it is).

    The fastest baseline is then never slower than the tuned full-budget one: a random start
    in the LR and budget ranges can miss the target on every trial, and a baseline that never
    reached the target is no yardstick."""
    speed = _study(s, "baseline-speed")
    if speed.get_trials(deepcopy=False):
        return False
    quality = _study(s, "baseline-quality")
    tuned = next(
        t
        for t in quality.get_trials(deepcopy=False)
        if t.number == target["tuned_baseline"]["trial"]
    )
    params = dict(tuned.params)
    if s.budget_low < 1.0:
        params["budget"] = 1.0
    speed.enqueue_trial(params, user_attrs={"seeded_from": "baseline-quality"})
    return True


def fastest_baseline(speed: optuna.Study, target: dict[str, Any]) -> dict[str, Any]:
    """The baseline every speedup is measured against: the baseline-speed trial that reached
    the target fastest; the configuration that set the target (full budget) if none did."""
    reached = [
        t
        for t in counted_trials(speed)
        if t.state.name == "COMPLETE"
        and math.isfinite(t.user_attrs.get("time_to_target_s", math.inf))
    ]
    if reached:
        best = min(reached, key=lambda t: t.value)
        return {
            "study": "baseline-speed",
            "trial": best.number,
            "changes": best.user_attrs["changes"],
        }
    tuned = target["tuned_baseline"]
    return {"study": "baseline-quality", "trial": tuned["trial"], "changes": tuned["changes"]}


def set_target(s: TuneSettings, cfg: DictConfig) -> dict[str, Any]:
    """Phase 1 and the pre-registered target (read back unchanged on resume)."""
    speed, methods = _study(s, "baseline-speed"), _study(s, "methods")
    existing = registered_target(methods)
    if existing is not None:
        return existing
    quality = _run_phase_parallel(s, "baseline-quality")
    best = _best(quality)
    changes = best.user_attrs["changes"]
    finals = _run_seeds(s, cfg, changes, s.seeds, "baseline-quality", None)
    median = target_from_finals([o["final"] for o in finals])
    value = median if s.target_value is None else s.target_value
    target = {
        "metric": s.metric,
        "value": value,
        "higher_is_better": s.higher_is_better,
        "source": "median of the tuned baseline" if s.target_value is None else "--target",
        "tuned_baseline_median": median,
        "tuned_baseline": {"trial": best.number, "changes": changes, "finals": finals},
    }
    return pre_register_target([speed, methods], target)


def calibrate(s: TuneSettings, cfg: DictConfig, full_steps: int) -> None:
    """The baseline's seconds per step (median of timing windows), once, into both studies;
    a miss costs twice the full-budget baseline's time."""
    from speedup.tuning.objective import measure_profile

    speed, methods = _study(s, "baseline-speed"), _study(s, "methods")
    if "baseline_step_s" in methods.user_attrs:
        return
    _, base_times = measure_profile(cfg, cfg, s.timing)
    step_s = statistics.median(base_times)
    for study in (speed, methods):
        study.set_user_attr("baseline_step_s", step_s)
        study.set_user_attr("miss_penalty_s", 2.0 * full_steps * step_s)


def seed_methods(s: TuneSettings, cfg: DictConfig) -> int:
    """Enqueue the best configurations of the bench sweep in ``s.seed_from`` as the methods
    study's first trials (once: a study that has trials is left as it is); how many."""
    from speedup.tuning.seeding import bench_seeds

    methods = _study(s, "methods")
    if methods.get_trials(deepcopy=False):
        return 0
    seeds = bench_seeds(s.seed_from, _space(s, cfg, "methods"), float(cfg.optimizer.lr))
    for params in seeds:
        methods.enqueue_trial(params, user_attrs={"seeded_from": str(s.seed_from)})
    print(f"methods: {len(seeds)} trials seeded from {s.seed_from}", file=sys.stderr)
    return len(seeds)


def tune(s: TuneSettings) -> dict[str, Any]:
    """Run (or resume) the whole protocol into ``s.out``; return results.json's content."""
    from speedup.tuning.report import write_outputs
    from speedup.tuning.validate import flops_speedup, judge

    from speedup.lock import RunLock

    check_settings(s)
    cfg = s.workload()
    space = Space.for_workload(cfg, s.algorithms)  # bad names or declarations: exit 2 now
    if s.seed_from:  # an unreadable sweep fails now, not after the baseline phases
        from speedup.tuning.seeding import bench_seeds

        bench_seeds(s.seed_from, space, float(cfg.optimizer.lr))
    out = Path(s.out)
    with RunLock(out):
        target = set_target(s, cfg)
        s.target_value = target["value"]
        full_steps = max(int(o["steps"]) for o in target["tuned_baseline"]["finals"])
        calibrate(s, cfg, full_steps)
        seed_baseline_speed(s, target)
        speed = _run_phase_parallel(s, "baseline-speed")
        if s.seed_from:
            seed_methods(s, cfg)
        methods = _run_phase_parallel(s, "methods")
        parity = (len(counted_trials(speed)), len(counted_trials(methods)))
        print(f"trials: baseline {parity[0]}, methods {parity[1]}", file=sys.stderr)
        # Proof on fresh seeds: the fastest baseline and the best method configurations.
        base = fastest_baseline(speed, target)
        ranked = sorted(
            (t for t in counted_trials(methods) if t.state.name == "COMPLETE"),
            key=lambda t: t.value,
        )
        finalists = [t for t in ranked if math.isfinite(t.user_attrs["time_to_target_s"])]
        finalists = finalists[: s.top_k]
        base_changes = base["changes"]
        base_profile = _profile(speed, with_changes(cfg, **base_changes), cfg, s)
        base_runs = _run_seeds(
            s, cfg, base_changes, s.validate_seeds, "validate-baseline", base_profile
        )
        base_times = [r["time_to_target_s"] for r in base_runs]
        base_run_times = [r["run_time_s"] for r in base_runs]
        validated = []
        for t in finalists:
            changes = t.user_attrs["changes"]
            profile = _profile(methods, with_changes(cfg, **changes), cfg, s)
            runs = _run_seeds(s, cfg, changes, s.validate_seeds, f"validate-{t.number}", profile)
            times = [r["time_to_target_s"] for r in runs]
            finals = [r["final"] for r in runs]
            row = judge(base_times, times, finals, baseline_run_times=base_run_times)
            row["flops_speedup"] = flops_speedup(
                [r.get("flops_to_target") for r in base_runs],
                [r.get("run_flops") for r in base_runs],
                [r.get("flops_to_target") for r in runs],
            )
            validated.append({"trial": t.number, "changes": changes, "runs": runs, **row})
        results = {
            "recipe": s.recipe,
            "settings": asdict(s),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "target": target,
            "trial_counts": {"baseline-speed": parity[0], "methods": parity[1]},
            "baseline_step_s": methods.user_attrs["baseline_step_s"],
            "miss_penalty_s": methods.user_attrs["miss_penalty_s"],
            "baseline": {**base, "runs": base_runs},
            "validated": validated,
            "storage": storage_spec(out, s.storage, s.parallel),
        }
        return write_outputs(out, results, {p: _study(s, p) for p in ("baseline-speed", "methods")})
