"""The composition benchmark harness: what each speedup, and each combination, buys.

A **suite** (YAML, shipped in ``benchmarks/suites/`` or any path) names a workload (a baseline
recipe plus overrides), a target metric value, the algorithms to compose with their
arguments, the seeds, the budget of every run, and which combinations to run (``singles``,
``pairs``, ``full``, or explicit lists). ``speedup bench SUITE`` then:

1. plans every combination with the engine; a conflicting one is reported and not run;
2. measures each configuration's **relative step cost** in a short interleaved timing phase
   (baseline and configuration alternating in ABBA order in one process, after one discarded
   warm-up pair) at several points of the run, so that schedules such as progressive resizing
   are sampled where they differ; the analysis integrates that profile up to the step where
   the target is crossed. Each window's cost is the median over whole periods of the mean
   step time, so work done every k-th step (SAM's ``interval``, Lookahead's ``k``, EMA's
   ``update_interval``) is counted. The result, ``timing.json``, is keyed by a hash of
   everything it depends on, so a different suite's timing is never reused;
3. runs baseline, singles, pairs and the full recipe for every seed, each in a directory
   named by the hash of its resolved config: a finished run is never recomputed (``--force``
   recomputes), so an interrupted sweep resumes;
4. writes ``results.json`` after every run, then ``report.md`` and the plots
   (:mod:`speedup.benchmarks.report`).

Every run records steps, samples, tokens and estimated FLOPs next to its training wall-clock
(evaluation excluded), so time-to-target can be reported as steps-to-target x calibrated step
cost as well as raw wall-clock, which on shared machines varies several-fold.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from omegaconf import DictConfig

from speedup.callback import Callback
from speedup.config import config_hash, load_config, resolve_recipe
from speedup.errors import ConfigError
from speedup.registry import suggest
from speedup.run import build_trainer, environment, plan_config, run_config

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "Suite",
    "load_suite",
    "suite_names",
    "run_suite",
    "configurations",
    "FlopsMeter",
    "measure_step_costs",
    "measure_step_profiles",
    "timing_key",
    "window_period",
]

BASELINE = "baseline"
COMBINATIONS = ("singles", "pairs", "full")
#: Metrics each model family reports at evaluation (Model.metrics + finalize_metrics).
METRICS_BY_KIND = {
    "cnn": {"accuracy", "loss", "top5_accuracy"},
    "mlp": {"accuracy", "loss", "top5_accuracy"},
    "generic": {"accuracy", "loss", "top5_accuracy"},
    "gpt2": {"loss", "perplexity", "accuracy"},
    "bert": {"loss", "perplexity", "masked_accuracy", "accuracy"},
}
_TIMING_KEYS = {"steps", "repeats", "positions", "period"}
#: Algorithms whose work recurs every k-th step: (argument, default). A timing window spans a
#: whole number of these periods (see :func:`window_period`).
PERIODIC_ARGUMENTS = {
    "sam": ("interval", 1),
    "lookahead": ("k", 5),
    "ema": ("update_interval", "1ba"),
}
#: Bumped when the timing phase's method changes: an older timing.json is then recomputed.
TIMING_VERSION = 2
_SUITE_KEYS = {
    "description",
    "workload",
    "target",
    "algorithms",
    "seeds",
    "budget",
    "combinations",
    "eval_interval",
    "timing",
    "smoke",
}


@dataclass
class Suite:
    name: str
    path: Path
    recipe: str
    overrides: list[str]
    metric: str
    target: float
    algorithms: dict[str, dict[str, Any]]
    seeds: list[int]
    budget: str
    combinations: list[Any]
    eval_interval: str = "1ep"
    timing: dict[str, Any] = field(default_factory=lambda: {"steps": 8, "repeats": 3})
    description: str = ""

    @property
    def higher_is_better(self) -> bool:
        from speedup.callbacks import lower_is_better

        return not lower_is_better(self.metric)


def _suite_dir() -> Path:
    return Path(str(resources.files("speedup.benchmarks"))) / "suites"


def suite_names() -> list[str]:
    return sorted(p.stem for p in _suite_dir().glob("*.yaml"))


def _fail(path: Path, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def load_suite(name_or_path: str, smoke: bool = False) -> Suite:
    """Read and validate a suite; every problem is a ConfigError naming the key and file."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = _suite_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            names = suite_names()
            raise ConfigError(
                f"unknown suite {name_or_path!r}{suggest(name_or_path, names)}; shipped "
                f"suites: {', '.join(names)} (or give a path to a YAML file)"
            )
    data = yaml.safe_load(path.read_text()) or {}
    for key in data:
        if key not in _SUITE_KEYS:
            raise _fail(
                path,
                f"unknown key {key!r}{suggest(key, sorted(_SUITE_KEYS))}; "
                f"allowed: {', '.join(sorted(_SUITE_KEYS))}",
            )
    if smoke:
        for key, value in (data.get("smoke") or {}).items():
            data[key] = value
    workload = data.get("workload") or {}
    if "recipe" not in workload:
        raise _fail(path, "workload.recipe: missing (a recipe name or path)")
    try:
        resolve_recipe(str(workload["recipe"]), relative_to=path.parent)
    except ConfigError as err:
        raise _fail(path, f"workload.recipe: {err}") from None
    target = data.get("target") or {}
    if "metric" not in target or "value" not in target:
        raise _fail(path, "target: needs metric and value, e.g. {metric: accuracy, value: 0.9}")
    suite = Suite(
        name=path.stem,
        path=path,
        recipe=str(workload["recipe"]),
        overrides=[str(o) for o in workload.get("overrides", [])],
        metric=str(target["metric"]),
        target=float(target["value"]),
        algorithms={k: dict(v or {}) for k, v in (data.get("algorithms") or {}).items()},
        seeds=[int(s) for s in data.get("seeds", [17])],
        budget=str(data.get("budget", "")),
        combinations=list(data.get("combinations", list(COMBINATIONS))),
        eval_interval=str(data.get("eval_interval", "1ep")),
        timing={"steps": 8, "repeats": 3, **(data.get("timing") or {})},
        description=str(data.get("description", "")),
    )
    _validate_timing(suite)
    _validate(suite)
    return suite


def _validate_timing(suite: Suite) -> None:
    """The timing phase's settings: counts are positive integers, positions fractions."""
    timing = suite.timing
    for key in timing:
        if key not in _TIMING_KEYS:
            raise _fail(
                suite.path,
                f"timing.{key}: unknown key{suggest(key, sorted(_TIMING_KEYS))}; "
                f"allowed: {', '.join(sorted(_TIMING_KEYS))}",
            )
    for key in ("steps", "repeats", "period"):
        if key in timing and not (
            isinstance(timing[key], int) and not isinstance(timing[key], bool) and timing[key] >= 1
        ):
            raise _fail(suite.path, f"timing.{key}: must be an integer >= 1, got {timing[key]!r}")
    positions = timing.get("positions", (0.1, 0.5, 0.9))
    if not isinstance(positions, list | tuple) or not positions:
        raise _fail(
            suite.path,
            f"timing.positions: a non-empty list of fractions in [0, 1], got {positions!r}",
        )
    for value in positions:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise _fail(
                suite.path, f"timing.positions: {value!r} is not a fraction of the run in [0, 1]"
            )


def _validate(suite: Suite) -> None:
    from speedup.algorithm import ALGORITHMS
    from speedup.models import MODELS

    for name in suite.algorithms:
        if name not in ALGORITHMS:
            raise _fail(
                suite.path,
                f"algorithms: unknown algorithm {name!r}"
                f"{suggest(name, ALGORITHMS.names())}; available: "
                f"{', '.join(ALGORITHMS.names())}",
            )
    for combo in suite.combinations:
        if isinstance(combo, str):
            if combo not in COMBINATIONS:
                raise _fail(
                    suite.path,
                    f"combinations: {combo!r} is not one of "
                    f"{', '.join(COMBINATIONS)} or a list of algorithms",
                )
        else:
            unknown = [a for a in combo if a not in suite.algorithms]
            if unknown:
                raise _fail(
                    suite.path, f"combinations: {unknown[0]!r} is not in the suite's algorithms"
                )
    cfg = _config(suite, [], suite.seeds[0], Path("."))  # validates the workload + overrides
    kind = getattr(MODELS.get(cfg.model.name), "kind", "generic")
    produced = METRICS_BY_KIND.get(kind, {"loss"})
    if suite.metric not in produced:
        raise _fail(
            suite.path,
            f"target.metric: {suite.metric!r} is not produced by the "
            f"workload's model ({cfg.model.name}, kind {kind}); it reports: "
            f"{', '.join(sorted(produced))}",
        )


def configurations(suite: Suite) -> list[list[str]]:
    """Baseline first, then the requested combinations, each once, in suite order."""
    names = list(suite.algorithms)
    chosen: list[list[str]] = [[]]
    for combo in suite.combinations:
        if combo == "singles":
            chosen += [[n] for n in names]
        elif combo == "pairs":
            chosen += [list(p) for p in itertools.combinations(names, 2)]
        elif combo == "full":
            chosen.append(names)
        else:
            chosen.append([n for n in names if n in combo])  # canonical (suite) order
    unique: list[list[str]] = []
    for combo in chosen:
        if combo not in unique:
            unique.append(combo)
    return unique


def config_name(algorithms: list[str]) -> str:
    return "+".join(algorithms) or BASELINE


def _algorithm_overrides(suite: Suite, algorithms: list[str]) -> list[str]:
    out = []
    for name in algorithms:
        args = suite.algorithms[name]
        if not args:
            out.append(f"algorithms.{name}={{}}")
        out += [f"algorithms.{name}.{k}={json.dumps(v)}" for k, v in args.items()]
    return out


def _config(suite: Suite, algorithms: list[str], seed: int, out: Path) -> DictConfig:
    overrides = [
        *suite.overrides,
        f"seed={seed}",
        f"eval_interval={suite.eval_interval}",
        "progress_bar=false",
        *_algorithm_overrides(suite, algorithms),
    ]
    if suite.budget:
        overrides.append(f"max_duration={suite.budget}")
    recipe = str(resolve_recipe(suite.recipe, relative_to=suite.path.parent))
    return load_config(recipe, overrides)


class FlopsMeter(Callback):
    """Estimated training FLOPs: the forward FLOPs per sample of each distinct input shape,
    counted once with torch's FlopCounterMode, times 3 (forward + backward), times samples.
    Logged as ``flops`` at every evaluation."""

    def __init__(self) -> None:
        self.per_sample: dict[tuple, float] = {}
        self.total = 0.0

    def before_forward(self, state: State, logger: Logger) -> None:
        inputs = next(iter(state.batch.values()))
        shape = tuple(inputs.shape[1:])
        if shape not in self.per_sample:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                state.model(state.batch)
            self.per_sample[shape] = counter.get_total_flops() / max(1, inputs.shape[0])
        self.total += 3 * self.per_sample[shape] * inputs.shape[0]

    def eval_end(self, state: State, logger: Logger) -> None:
        logger.log_metrics({"flops": self.total})

    def state_dict(self) -> dict:
        return {"total": self.total}


class _StopAfter(Callback):
    def __init__(self, steps: int) -> None:
        self.steps, self.done = steps, 0

    def batch_end(self, state: State, logger: Logger) -> None:
        self.done += 1
        if self.done >= self.steps:
            state.stop_training("timing window done")


def _period_steps(value: Any) -> int | None:
    """A period given as an int or as a Time string in batches (``"20ba"``); None otherwise
    (an epoch-based period cannot be spanned by a short window)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.endswith("ba") and text[:-2].strip().isdigit():
        return int(text[:-2])
    return None


def window_period(suite: Suite, algorithms: list[str]) -> int:
    """Steps per period of the recurring work of ``algorithms``: the least common multiple of
    ``timing.period`` (default 1) and each periodic algorithm's interval
    (:data:`PERIODIC_ARGUMENTS`), so a window of whole periods counts each one's extra step."""
    chosen = {name: suite.algorithms.get(name, {}) for name in algorithms}
    return algorithms_period(chosen, int(suite.timing.get("period", 1)))


def algorithms_period(algorithms: Mapping[str, Mapping[str, Any]], base: int = 1) -> int:
    """Steps per period of the recurring work of ``algorithms`` (name -> its arguments): the
    least common multiple of ``base`` and each periodic algorithm's interval."""
    period = base
    for name, args in algorithms.items():
        if name not in PERIODIC_ARGUMENTS:
            continue
        argument, default = PERIODIC_ARGUMENTS[name]
        steps = _period_steps((args or {}).get(argument, default))
        if steps and steps > 1:
            period = math.lcm(period, steps)
    return period


def time_window_detail(
    cfg: DictConfig, position: float, steps: int, period: int = 1
) -> tuple[float, float, int]:
    """Seconds per step over ``steps`` steps (data loading included) starting at ``position``
    (a fraction of the run), the fraction of the run at the window's middle, and the run's
    total steps. ``steps`` is rounded up to whole ``period``s and the cost is
    :func:`~speedup.benchmarks.analysis.period_mean`. Every window is a fresh trainer whose
    first step pays one-off costs (allocations, the data iterator, lazy modules), so one extra
    first step runs and is dropped."""
    from speedup.benchmarks.analysis import period_mean

    steps = period * math.ceil(steps / period)
    durations: list[float] = []

    class StepClock(Callback):
        def before_dataloader(self, state: State, logger: Logger) -> None:
            self.started = time.perf_counter()

        def batch_end(self, state: State, logger: Logger) -> None:
            durations.append(time.perf_counter() - self.started)

    trainer = build_trainer(cfg, extra_callbacks=[StepClock(), _StopAfter(steps + 1)])
    trainer.state.eval_dataloader = None  # timing only: no evaluation
    total = int(trainer.converter.to_batches(trainer.state.max_duration))
    start = max(0, min(int(position * total), total - steps - 1))
    trainer.seek(start)
    trainer.fit()
    measured = durations[1:] or durations
    # A run shorter than one period (a smoke budget) leaves only single steps to compare.
    cost = period_mean(measured, period if len(measured) >= period else 1)
    # Measured steps are start+1 .. start+steps; step i occupies [i, i+1) of the run.
    middle = (start + 1 + len(measured) / 2) / total if total else position
    return cost, min(max(middle, 0.0), 1.0), total


def time_window(cfg: DictConfig, position: float, steps: int, period: int = 1) -> float:
    """Seconds per step of a timing window: see :func:`time_window_detail`."""
    return time_window_detail(cfg, position, steps, period)[0]


def measure_step_profiles(suite: Suite, configs: list[list[str]], out: Path) -> dict[str, Any]:
    """The timing phase: ``{"baseline_step_time_s", "step_cost", "step_cost_profile"}``.

    For each configuration and each of ``timing.positions`` (fractions of the run),
    ``timing.repeats`` pairs of windows, baseline and configuration, in ABBA order (the pairs
    alternate which arm runs first, so neither always gets a warmer cache or a quieter
    machine); a pair's ratio is configuration / baseline, and a position's cost the median of
    its pairs. Before anything is recorded one pair runs and is discarded: the process's first
    windows pay for imports, allocator growth and kernel selection. ``step_cost_profile``
    holds per configuration the measured points (window middle as a fraction of the run, cost)
    and the pair ratios behind each; ``step_cost`` is the profile's run average (piecewise
    linear, :func:`~speedup.benchmarks.analysis.integrated_cost`); baseline seconds per step
    is the median of all baseline windows."""
    from speedup.benchmarks.analysis import integrated_cost

    steps, repeats = int(suite.timing["steps"]), int(suite.timing["repeats"])
    positions = [float(p) for p in suite.timing.get("positions", (0.1, 0.5, 0.9))]
    seed = suite.seeds[0]
    base_cfg = _config(suite, [], seed, out)
    others = [a for a in configs if a]
    # Warm-up pair, discarded.
    time_window(base_cfg, positions[0], steps)
    if others:
        time_window(_config(suite, others[0], seed, out), positions[0], steps)
    base_times: list[float] = []
    costs: dict[str, float] = {BASELINE: 1.0}
    profiles: dict[str, dict[str, Any]] = {}
    for algorithms in others:
        cfg = _config(suite, algorithms, seed, out)
        period = window_period(suite, algorithms)
        points, samples, total = [], [], 0
        pair = 0
        for position in positions:
            ratios, middles = [], []
            for _ in range(repeats):
                order = ("base", "config") if pair % 2 == 0 else ("config", "base")
                pair += 1
                timed = {}
                for arm in order:
                    arm_cfg = base_cfg if arm == "base" else cfg
                    timed[arm] = time_window_detail(arm_cfg, position, steps, period)
                b, c = timed["base"][0], timed["config"][0]
                base_times.append(b)
                ratios.append(c / b)
                middles.append(timed["config"][1])
                total = timed["config"][2]
            points.append([statistics.fmean(middles), statistics.median(ratios)])
            samples.append(ratios)
        name = config_name(algorithms)
        profiles[name] = {"total_steps": total, "points": points, "samples": samples}
        costs[name] = integrated_cost(points, total, total) / total if total else points[0][1]
    if not base_times:
        base_times = [time_window(base_cfg, p, steps) for p in positions]
    return {
        "baseline_step_time_s": statistics.median(base_times),
        "step_cost": costs,
        "step_cost_profile": profiles,
    }


def measure_step_costs(
    suite: Suite, configs: list[list[str]], out: Path
) -> tuple[float, dict[str, float]]:
    """Median baseline seconds per step, and each configuration's run-average cost relative
    to it (:func:`measure_step_profiles`, less the profiles)."""
    timing = measure_step_profiles(suite, configs, out)
    return timing["baseline_step_time_s"], timing["step_cost"]


def timing_key(suite: Suite, configs: list[list[str]], out: Path) -> str:
    """Hash of everything the timing phase depends on: the method's version, the timing
    settings and the resolved config (:func:`~speedup.config.config_hash`) of every timed
    configuration. A ``timing.json`` with another key belongs to another suite (or an edited
    one) and is recomputed."""
    content = {
        "version": TIMING_VERSION,
        "timing": {k: suite.timing[k] for k in sorted(suite.timing)},
        "configs": {
            config_name(a): config_hash(_config(suite, a, suite.seeds[0], out)) for a in configs
        },
    }
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_measure_timing(
    suite: Suite, configs: list[list[str]], out: Path, force: bool = False
) -> dict[str, Any]:
    """``out/timing.json`` if it was measured for exactly this suite (same :func:`timing_key`),
    else a fresh timing phase, saved there with its key."""
    timing_file = out / "timing.json"
    key = timing_key(suite, configs, out)
    if timing_file.exists() and not force:
        saved = json.loads(timing_file.read_text())
        if saved.get("timing_key") == key:
            return saved
        print(
            f"timing.json in {out} was measured for another suite or settings "
            f"(key {saved.get('timing_key')!r}, this suite {key!r}): measuring again"
        )
    print(f"timing phase: {len(configs) - 1} configurations against the baseline")
    timing = {"timing_key": key, **measure_step_profiles(suite, configs, out)}
    _write_json(timing_file, timing)
    return timing


def metric_curve(run_dir: Path, metric: str) -> list[dict[str, Any]]:
    """The evaluations of ``eval/<metric>`` in a run's ``metrics.jsonl``, in step order: each a
    dict of ``step``, ``epoch``, ``sample``, ``token``, ``train_time_s``, ``value`` and, when
    a :class:`FlopsMeter` counted them, ``flops`` (the input of
    :func:`~speedup.benchmarks.analysis.time_to_target`)."""
    points: dict[int, dict[str, Any]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record["step"]
        if f"eval/{metric}" in record:
            points.setdefault(step, {}).update(
                step=step,
                epoch=record["epoch"],
                sample=record["sample"],
                token=record.get("token", 0),
                train_time_s=record["train_time_s"],
                value=record[f"eval/{metric}"],
            )
        if "flops" in record and step in points:
            points[step]["flops"] = record["flops"]
    return [points[s] for s in sorted(points)]


def run_suite(
    suite: Suite,
    out: str | Path,
    force: bool = False,
    progress: bool = True,
    parallel: int = 1,
    nproc: int = 1,
) -> dict[str, Any]:
    """Run (or resume) the sweep; write results.json and the report; return the results.

    ``parallel`` > 1 runs that many of the sweep's independent runs at once, each in its own
    process (``nproc`` > 1: each through torchrun with that many processes). Concurrent runs
    share the machine, so their wall-clock times are only comparable with each other when
    each has its own devices (GPUs are split between the slots).

    ``out`` is locked while the sweep runs (:class:`speedup.lock.RunLock`): a second sweep into
    it raises :class:`~speedup.lock.RunLockedError` naming the first's PID."""
    from speedup.lock import RunLock

    with RunLock(out):
        return _run_suite(suite, Path(out), force, progress, parallel, nproc)


def _run_suite(
    suite: Suite, out: Path, force: bool, progress: bool, parallel: int, nproc: int
) -> dict[str, Any]:
    """:func:`run_suite` once ``out`` is locked."""
    from speedup.benchmarks.analysis import time_to_target
    from speedup.benchmarks.report import write_report
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "suite": suite.name,
        "description": suite.description,
        "workload": {"recipe": suite.recipe, "overrides": suite.overrides, "budget": suite.budget},
        "target": {
            "metric": suite.metric,
            "value": suite.target,
            "higher_is_better": suite.higher_is_better,
        },
        "seeds": suite.seeds,
        "algorithms": suite.algorithms,  # each algorithm's arguments (tune --seed-from)
        "environment": environment(),
        "conflicts": {},
        "runs": [],
    }
    runnable = []
    for algorithms in configurations(suite):
        plan, _ = plan_config(_config(suite, algorithms, suite.seeds[0], out))
        if plan.conflicts:
            results["conflicts"][config_name(algorithms)] = "; ".join(map(str, plan.conflicts))
            print(f"not run, conflict: {config_name(algorithms)}: {plan.conflicts[0]}")
        else:
            runnable.append(algorithms)

    results.update(load_or_measure_timing(suite, runnable, out, force))

    jobs = [(a, s) for a in runnable for s in suite.seeds]
    configs = []
    for algorithms, seed in jobs:
        cfg = _config(suite, algorithms, seed, out)
        run_dir = out / "runs" / f"{config_name(algorithms)}-seed{seed}-{config_hash(cfg)}"
        cfg.run_dir = str(run_dir)
        configs.append(cfg)
    todo = [c for c in configs if force or not (Path(c.run_dir) / "summary.json").exists()]
    if force:  # recompute: a finished run would otherwise report itself complete, unchanged
        for cfg in todo:
            cfg.resume = "never"
    fresh_dirs = {c.run_dir for c in todo}
    bar = tqdm(total=len(jobs), desc="runs", unit="run", disable=not progress)
    bar.update(len(jobs) - len(todo))
    if parallel > 1 or nproc > 1:
        run_in_processes(todo, out / "requests", parallel, nproc, on_done=lambda _: bar.update())
    else:
        for cfg in todo:
            bar.set_postfix_str(Path(cfg.run_dir).name)
            run_config(cfg, extra_callbacks=[FlopsMeter()])
            bar.update()
    for (algorithms, seed), cfg in zip(jobs, configs):
        name = config_name(algorithms)
        run_dir = Path(cfg.run_dir)
        cached = cfg.run_dir not in fresh_dirs
        summary = json.loads((run_dir / "summary.json").read_text())
        print(
            f"{'cached' if cached else 'ran   '} {name} seed {seed}: "
            f"{suite.metric}={summary['metrics'].get(suite.metric, float('nan')):.4f}"
        )
        curve = metric_curve(run_dir, suite.metric)
        better = suite.higher_is_better
        results["runs"].append(
            {
                "config": name,
                "algorithms": algorithms,
                "seed": seed,
                "config_hash": summary["config_hash"],
                "run_dir": str(run_dir),
                "cached": cached,
                "time_to_target_s": time_to_target(curve, suite.target, better),
                "steps_to_target": time_to_target(curve, suite.target, better, x="step"),
                "curve": curve,
                "final": summary["metrics"],
                "steps": summary["steps"],
                "samples": summary["samples"],
                "tokens": summary["tokens"],
                "train_time_s": summary["train_time_s"],
                "eval_time_s": summary["eval_time_s"],
            }
        )
        _write_json(out / "results.json", results)
    bar.close()
    write_report(out, results)
    return results


def run_in_processes(
    configs: list[DictConfig],
    requests: Path,
    parallel: int,
    nproc: int = 1,
    on_done: Any = None,
) -> None:
    """Run each config (``run_dir`` set) in a process of its own, ``parallel`` at a time;
    with ``nproc`` > 1 each run is a torchrun job. On a machine with GPUs, slot ``i`` gets
    GPUs ``i*nproc .. (i+1)*nproc - 1``. Raises if any run fails, naming its log."""
    import os
    import subprocess
    import sys

    from omegaconf import OmegaConf

    requests.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    if gpus == 0 and parallel > 1:
        print(f"note: {parallel} runs share the CPU cores: their timings include contention")
    pending = list(configs)
    running: dict[int, tuple[subprocess.Popen, Path, Any]] = {}  # slot -> process
    failures = []
    while pending or running:
        for slot in [s for s in range(parallel) if s not in running]:
            if not pending:
                break
            cfg = pending.pop(0)
            name = Path(cfg.run_dir).name
            request = requests / f"{name}.yaml"
            request.write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
            worker = ["-m", "speedup.benchmarks.harness", "--run-request", str(request)]
            if nproc > 1:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                command += [f"--nproc-per-node={nproc}", *worker]
            else:
                command = [sys.executable, *worker]
            env = dict(os.environ)
            if gpus >= (slot + 1) * nproc:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(
                    str(g) for g in range(slot * nproc, (slot + 1) * nproc)
                )
            log = request.with_suffix(".log")
            with log.open("w") as handle:
                process = subprocess.Popen(command, stdout=handle, stderr=handle, env=env)
            running[slot] = (process, log, cfg)
        time.sleep(0.2)
        for slot, (process, log, cfg) in list(running.items()):
            if process.poll() is None:
                continue
            del running[slot]
            if process.returncode != 0:
                failures.append(f"{Path(cfg.run_dir).name} (exit {process.returncode}, log {log})")
            elif on_done is not None:
                on_done(cfg)
    if failures:
        raise RuntimeError("benchmark runs failed: " + "; ".join(failures))


def _run_request(path: str) -> None:
    """A worker: train one requested config (written by :func:`run_in_processes`)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    OmegaConf.set_struct(cfg, False)
    run_config(cfg, extra_callbacks=[FlopsMeter()])


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--run-request":
        _run_request(sys.argv[2])
    else:
        raise SystemExit("usage: python -m speedup.benchmarks.harness --run-request FILE.yaml")
