"""The composition benchmark harness: what each speedup, and each combination, buys.

A **suite** (YAML, shipped in ``benchmarks/suites/`` or any path) names a workload (a baseline
recipe plus overrides), a target metric value, the algorithms to compose with their
arguments, the seeds, the budget of every run, and which combinations to run (``singles``,
``pairs``, ``full``, or explicit lists). ``speedup bench SUITE`` then:

1. plans every combination with the engine; a conflicting one is reported and not run;
2. measures each configuration's **relative step cost** in a short interleaved timing phase
   (baseline and configuration alternating in one process, medians, at several points of the
   run so that schedules such as progressive resizing are sampled where they differ);
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

import itertools
import json
import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig

from speedup.callback import Callback
from speedup.config import ConfigError, config_hash, load_config, resolve_recipe
from speedup.registry import suggest
from speedup.run import build_trainer, environment, plan_config, run_config

__all__ = ["Suite", "load_suite", "suite_names", "run_suite", "configurations", "FlopsMeter"]

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
LOWER_IS_BETTER = {"loss", "perplexity"}
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
        return self.metric not in LOWER_IS_BETTER


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
    _validate(suite)
    return suite


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

    def before_forward(self, state, logger) -> None:  # noqa: ANN001
        inputs = next(iter(state.batch.values()))
        shape = tuple(inputs.shape[1:])
        if shape not in self.per_sample:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                state.model(state.batch)
            self.per_sample[shape] = counter.get_total_flops() / max(1, inputs.shape[0])
        self.total += 3 * self.per_sample[shape] * inputs.shape[0]

    def eval_end(self, state, logger) -> None:  # noqa: ANN001
        logger.log_metrics({"flops": self.total})

    def state_dict(self) -> dict:
        return {"total": self.total}


class _StopAfter(Callback):
    def __init__(self, steps: int) -> None:
        self.steps, self.done = steps, 0

    def batch_end(self, state, logger) -> None:  # noqa: ANN001
        self.done += 1
        if self.done >= self.steps:
            state.stop_training("timing window done")


def _time_window(cfg: DictConfig, position: float, steps: int) -> float:
    """Median seconds per step (data loading included) over ``steps`` steps starting at
    ``position`` (a fraction of the run); one extra first step is run as warm-up."""
    durations: list[float] = []

    class StepClock(Callback):
        def before_dataloader(self, state, logger) -> None:  # noqa: ANN001
            self.started = time.perf_counter()

        def batch_end(self, state, logger) -> None:  # noqa: ANN001
            durations.append(time.perf_counter() - self.started)

    trainer = build_trainer(cfg, extra_callbacks=[StepClock(), _StopAfter(steps + 1)])
    trainer.state.eval_dataloader = None  # timing only: no evaluation
    total = int(trainer.converter.to_batches(trainer.state.max_duration))
    trainer.seek(max(0, min(int(position * total), total - steps - 1)))
    trainer.fit()
    return statistics.median(durations[1:] or durations)


def measure_step_costs(
    suite: Suite, configs: list[list[str]], out: Path
) -> tuple[float, dict[str, float]]:
    """Median baseline seconds per step, and each configuration's cost relative to it,
    baseline and configuration alternating at every position (fractions of the run) and
    repeat; a configuration's cost is the mean over positions of the median ratios."""
    steps, repeats = int(suite.timing["steps"]), int(suite.timing["repeats"])
    positions = [float(p) for p in suite.timing.get("positions", (0.1, 0.5, 0.9))]
    seed = suite.seeds[0]
    base_cfg = _config(suite, [], seed, out)
    base_times, ratios = [], {}
    for algorithms in configs:
        if not algorithms:
            continue
        cfg = _config(suite, algorithms, seed, out)
        per_position = []
        for position in positions:
            pairs = []
            for _ in range(repeats):
                b = _time_window(base_cfg, position, steps)
                c = _time_window(cfg, position, steps)
                base_times.append(b)
                pairs.append(c / b)
            per_position.append(statistics.median(pairs))
        ratios[config_name(algorithms)] = statistics.fmean(per_position)
    if not base_times:
        base_times = [_time_window(base_cfg, p, steps) for p in positions]
    return statistics.median(base_times), {BASELINE: 1.0, **ratios}


def _curve(run_dir: Path, metric: str) -> list[dict[str, Any]]:
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

    timing_file = out / "timing.json"
    if timing_file.exists() and not force:
        timing = json.loads(timing_file.read_text())
    else:
        print(f"timing phase: {len(runnable) - 1} configurations against the baseline")
        base, costs = measure_step_costs(suite, runnable, out)
        timing = {"baseline_step_time_s": base, "step_cost": costs}
        timing_file.write_text(json.dumps(timing, indent=2) + "\n")
    results.update(timing)

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
        curve = _curve(run_dir, suite.metric)
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
