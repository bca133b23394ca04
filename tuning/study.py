"""Optuna studies of a tune: where they live, how they are created, how trials are counted.

A tune keeps three studies in one storage: ``baseline-quality`` (phase 1), ``baseline-speed``
and ``methods`` (phase 2, the same trial count each). The default storage is in the output
directory: SQLite (``study.db``) for one worker; for ``--parallel K`` a journal file
(``study.journal``), because Optuna's own documentation advises against SQLite with
concurrent workers (``research/search-and-records.md``, Part 2, "Storage"). ``--storage``
takes any Optuna URL (PostgreSQL, MySQL) for workers on many machines; those get a heartbeat
so a killed worker's trial is failed and not left RUNNING forever.

Every sampler flag is set explicitly: Optuna 5 changed TPE's defaults, and a study must mean
the same thing on every version that resumes it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from speedup.errors import ConfigError

__all__ = [
    "PHASES",
    "IncumbentPruner",
    "counted_trials",
    "make_sampler",
    "open_storage",
    "open_study",
    "optimize_until",
    "storage_spec",
]

PHASES = ("baseline-quality", "baseline-speed", "methods")


def storage_spec(out: Path, storage: str | None, parallel: int) -> str:
    """A picklable description of the storage: an Optuna URL or ``journal:<path>``."""
    if storage:
        return storage
    db, journal = out / "study.db", out / "study.journal"
    if db.exists() and not journal.exists():
        if parallel > 1:
            raise ConfigError(
                f"--parallel {parallel}: the study in {db} is SQLite, which does not support "
                "concurrent workers; resume it with --parallel 1, or use --storage"
            )
        return f"sqlite:///{db.resolve()}"
    if journal.exists() or parallel > 1:
        return f"journal:{journal.resolve()}"
    return f"sqlite:///{db.resolve()}"


def open_storage(spec: str) -> Any:
    """The Optuna storage a :func:`storage_spec` names."""
    if spec.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(spec[len("journal:") :]))
    if spec.startswith("sqlite:"):
        return spec
    try:  # a shared database: heartbeats fail the trials of workers that died
        return optuna.storages.RDBStorage(spec, heartbeat_interval=60, grace_period=180)
    except Exception as err:  # noqa: BLE001 - any driver error means a bad URL
        raise ConfigError(f"--storage: cannot open {spec!r}: {err}") from None


def make_sampler(seed: int, n_startup_trials: int) -> optuna.samplers.TPESampler:
    """TPE over a conditional space (algorithm on -> its arguments): multivariate with
    ``group`` decomposes it; ``constant_liar`` keeps parallel workers off each other's
    running configurations."""
    import warnings

    with warnings.catch_warnings():  # ``group`` is marked experimental; it is what we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            n_startup_trials=n_startup_trials,
            n_ei_candidates=24,
            multivariate=True,
            group=True,
            constant_liar=True,
            seed=seed,
        )


def make_pruner(first_rung: float) -> optuna.pruners.BasePruner:
    """Asynchronous successive halving on budget fractions (steps 0-1000): no trial is pruned
    before ``first_rung`` of its budget, so methods that pay off late get that far."""
    from speedup.tuning.objective import pruner_step

    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=max(1, pruner_step(first_rung)), reduction_factor=3
    )


class IncumbentPruner(optuna.pruners.BasePruner):
    """The pruner of a time-to-target study: stop a trial once it can no longer be the
    fastest, i.e. once it has trained ``slack`` times longer than the fastest finished trial
    took to reach the target, without reaching it itself.

    Successive halving ranks trials by their metric at the same fraction of their own
    budget; when the budget is itself searched, a short compressed schedule has taken fewer
    steps at any fraction than a long one, so it ranks lower and is pruned for being short,
    the opposite of what a search for speed wants. This rule compares what the objective
    compares, time, so it is blind to the budget and to when a method pays off: a trial is
    stopped only when even reaching the target at its next evaluation would make it slower
    than the incumbent (up to ``slack``, which absorbs the noise of raw wall-clock on a
    shared machine). The elapsed time and whether the target was reached are the trial's
    ``elapsed_s`` and ``reached_target`` attributes (:class:`BudgetFractionReporter`)."""

    def __init__(self, slack: float = 1.5) -> None:
        if slack < 1.0:
            raise ValueError(f"IncumbentPruner: slack must be >= 1, got {slack}")
        self.slack = slack

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        elapsed = trial.user_attrs.get("elapsed_s")
        if elapsed is None or trial.user_attrs.get("reached_target"):
            return False
        finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        times = [t.user_attrs.get("raw_time_to_target_s", math.inf) for t in finished]
        incumbent = min((t for t in times if math.isfinite(t)), default=math.inf)
        return elapsed > self.slack * incumbent


def open_study(
    spec: str, phase: str, direction: str, seed: int = 0, n_startup: int = 10, rung: float = 0.25
) -> optuna.Study:
    """The study of ``phase``: the quality phase (one budget) prunes by successive halving on
    the metric, the time-to-target phases (searched budgets) by :class:`IncumbentPruner`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = make_pruner(rung) if phase == "baseline-quality" else IncumbentPruner()
    return optuna.create_study(
        storage=open_storage(spec),
        study_name=phase,
        direction=direction,
        sampler=make_sampler(seed, n_startup),
        pruner=pruner,
        load_if_exists=True,
    )


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards the budget: finished or pruned, not infeasible
    (a conflicting composition is refused before training and costs nothing)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [
        t
        for t in study.get_trials(deepcopy=False, states=states)
        if not t.user_attrs.get("infeasible")
    ]


def fail_interrupted(study: optuna.Study) -> list[dict[str, Any]]:
    """Mark the RUNNING trials of an interrupted local tune FAILED (only one process owns a
    local study: the output directory is locked); return their parameters to re-enqueue."""
    params = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        if t.params:
            params.append(t.params)
    return params


def optimize_until(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    n_trials: int,
    label: str = "",
    progress: bool = True,
) -> None:
    """Run trials until ``n_trials`` count (:func:`counted_trials`), resuming a study that
    already has some. Infeasible draws are retried, up to 20 per counted trial."""
    started, done_at_start = time.monotonic(), len(counted_trials(study))

    def stop_when_done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = counted_trials(study)
        if progress:
            _progress(study, done, n_trials, label, started, done_at_start)
        if len(done) >= n_trials:
            study.stop()

    if len(counted_trials(study)) >= n_trials:
        return
    attempts = 20 * n_trials
    study.optimize(
        objective, n_trials=attempts, callbacks=[stop_when_done], catch=(), gc_after_trial=True
    )


def _progress(
    study: optuna.Study,
    done: list[optuna.trial.FrozenTrial],
    total: int,
    label: str,
    started: float,
    done_at_start: int,
) -> None:
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in done)
    complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
    best = "-"
    if complete:
        best_trial = (min if study.direction.name == "MINIMIZE" else max)(
            complete, key=lambda t: t.value
        )
        best = f"{best_trial.value:.4g} (trial {best_trial.number})"
    new = len(done) - done_at_start
    eta = "-"
    if new > 0 and len(done) < total:
        eta = f"{(time.monotonic() - started) / new * (total - len(done)):.0f} s"
    elif len(done) >= total:
        eta = "0 s"
    print(
        f"[{label}] trials {len(done)}/{total} (pruned {pruned}), best {best}, ETA {eta}",
        file=sys.stderr,
        flush=True,
    )


def finite_or(value: float, penalty: float) -> float:
    """A miss (inf) as the finite penalty the sampler is given."""
    return penalty if math.isinf(value) or math.isnan(value) else value
