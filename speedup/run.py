"""From a validated recipe to a finished run directory.

``run_recipe("quickstart", ["seed=3"])`` is what ``speedup run quickstart seed=3`` does. The
run directory (default ``runs/<recipe>-<hash of the resolved config>``) receives
``config.yaml``, ``metrics.jsonl`` and, at the end, ``summary.json``.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from speedup import distributed
from speedup.config import (
    DATA_LOADER_KEYS,
    NOT_TRAINING_KEYS,
    ConfigError,
    check_batch_fits,
    check_global_batch,
    config_hash,
    load_recipe,
)
from speedup.errors import PlanError
from speedup.loggers import JSONLLogger, LoggerDestination, ProgressBar, build_loggers

if TYPE_CHECKING:
    from speedup.algorithm import Algorithm, Declaration
    from speedup.engine import Plan

__all__ = [
    "build_trainer",
    "plan_config",
    "run_config",
    "run_recipe",
    "default_run_dir",
    "environment",
]


def default_run_dir(cfg: DictConfig) -> Path:
    return Path("runs") / f"{cfg.recipe}-{config_hash(cfg)}"


def environment() -> dict[str, Any]:
    """Library versions and hardware, stored with every result."""
    from speedup import __version__

    info = {
        "speedup": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _subset(split: Any, limit: int | None) -> Any:
    if limit is None or split is None:
        return split
    if isinstance(split, dict):
        return {k: v[:limit] for k, v in split.items()}
    from torch.utils.data import Subset

    return Subset(split, range(min(limit, len(split))))


def build_trainer(
    cfg: DictConfig,
    loggers: list[LoggerDestination] = (),
    trace: bool = False,
    extra_algorithms: list = (),
    extra_callbacks: list = (),
    algorithms: list[Algorithm] | None = None,
    plan: Plan | None = None,
):
    """Data, model, algorithms, callbacks and a Trainer, all from the config; ``extra_*`` are
    instances added by experiment drivers (the lottery's fixed masks, stop points).
    ``algorithms``: the recipe's, already built (by :func:`speedup.config.load_recipe`'s
    validation), and ``plan``: :func:`plan_config`'s plan of them, which the engine uses as is
    when nothing was added and the model and data are of the kinds planned for; by default
    built from ``cfg.algorithms`` and planned by the engine."""
    from speedup.algorithm import build_algorithms
    from speedup.callback import CALLBACKS
    from speedup.data import DATASETS, build_dataloaders
    from speedup.guard import NonFiniteGuard
    from speedup.models import build_model
    from speedup.trainer import Trainer, seed_everything

    if cfg.threads:  # oversubscribed machines train faster with fewer intra-op threads
        torch.set_num_threads(cfg.threads)
    _init_distributed(cfg)
    rank, world = distributed.rank(), distributed.world_size()
    data = OmegaConf.to_container(cfg.data)
    check_global_batch(data["batch_size"], world)
    seed_everything(cfg.seed, cfg.deterministic)  # before any weight is initialised
    dataset_args = {k: v for k, v in data.items() if k not in DATA_LOADER_KEYS}
    splits = DATASETS.get(data["name"])(**dataset_args)
    splits.train = _subset(splits.train, data.get("train_samples"))
    splits.eval = _subset(splits.eval, data.get("eval_samples"))
    if isinstance(splits.train, dict) or hasattr(splits.train, "__len__"):  # before any step
        train_size = (
            len(next(iter(splits.train.values())))
            if isinstance(splits.train, dict)
            else len(splits.train)
        )
        check_batch_fits(data["batch_size"], train_size)
    train_loader, eval_loader = build_dataloaders(
        splits,
        batch_size=data["batch_size"],
        eval_batch_size=data.get("eval_batch_size"),
        seed=cfg.seed if cfg.get("data_seed") is None else cfg.data_seed,
        num_workers=data.get("num_workers") or 0,
        rank=rank,
        world_size=world,
    )
    model_args = OmegaConf.to_container(cfg.model)
    model = build_model(model_args.pop("name"), splits.info, **model_args)
    if algorithms is None:
        algorithms = build_algorithms(OmegaConf.to_container(cfg.algorithms))
    algorithms = [*algorithms, *extra_algorithms]
    callbacks = [
        CALLBACKS.get(name)(**(args or {}))
        for name, args in OmegaConf.to_container(cfg.callbacks).items()
    ] + [NonFiniteGuard(cfg.get("nonfinite", "stop")), *extra_callbacks]
    trainer = Trainer(
        model,
        train_loader,
        cfg.max_duration,
        eval_dataloader=eval_loader,
        optimizer=OmegaConf.to_container(cfg.optimizer),
        scheduler=OmegaConf.to_container(cfg.scheduler),
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=list(loggers),
        eval_interval=cfg.eval_interval,
        log_interval=cfg.log_interval,
        microbatch_size=cfg.microbatch_size,
        precision=cfg.precision,
        device=cfg.device,
        seed=cfg.seed,
        deterministic=cfg.deterministic,
        compile=cfg.compile,
        scale_schedule_ratio=cfg.scale_schedule_ratio,
        data_kind=splits.info.kind,
        tokens_per_sample=splits.info.tokens_per_sample,
        trace=trace,
        strategy=cfg.distributed.get("strategy", "ddp"),
        fsdp_param_dtype=cfg.distributed.get("param_dtype"),
        plan=plan,
    )
    if world > 1:
        # Same initial weights everywhere (seeded above; DDP also broadcasts them), but each
        # process draws its own dropout and augmentation randomness from here on.
        seed_everything(cfg.seed * 1_000_003 + rank, cfg.deterministic)
    return trainer


def plan_config(
    cfg: DictConfig, algorithms: list[Algorithm] | None = None
) -> tuple[Plan, dict[str, Declaration]]:
    """The engine's plan for the recipe's algorithms, without building data or model, and
    their declarations. ``algorithms``: already built from ``cfg.algorithms`` (by
    :func:`speedup.config.load_recipe`), to be passed on with the plan to :func:`run_config`,
    whose engine then uses this plan as is (``speedup plan`` prints the plan ``speedup run``
    trains with)."""
    from speedup.algorithm import ALGORITHMS, build_algorithms
    from speedup.data import DATASETS
    from speedup.engine import build_plan, long_time_constants
    from speedup.models import MODELS
    from speedup.optim import schedule_time_constants
    from speedup.time import Time

    if algorithms is None:
        algorithms = build_algorithms(OmegaConf.to_container(cfg.algorithms))
    declarations = {a.name: a.declare() for a in algorithms}
    # Time constants longer than the run: those comparable before the data is built (an
    # epoch's length is known once it is; the Trainer checks the rest then).
    max_duration = Time.parse(cfg.max_duration) * cfg.scale_schedule_ratio
    plan = build_plan(
        declarations,
        model_kind=getattr(MODELS.get(cfg.model.name), "kind", None),
        data_kind=getattr(DATASETS.get(cfg.data.name), "kind", None),
        known_names=set(ALGORITHMS.names()),
        algorithms=algorithms,
        max_duration=max_duration,
        batch_size=cfg.data.batch_size,
    )
    schedule = schedule_time_constants(
        OmegaConf.to_container(cfg.scheduler), cfg.scale_schedule_ratio
    )
    plan.warnings.extend(
        long_time_constants(schedule, max_duration, batch_size=cfg.data.batch_size)
    )
    return plan, declarations


def run_config(
    cfg: DictConfig,
    extra_callbacks: list = (),
    algorithms: list[Algorithm] | None = None,
    plan: Plan | None = None,
) -> dict[str, Any]:
    """Train the validated config; write the run directory; return the summary.

    Checkpoints go to ``<run_dir>/checkpoints`` (``cfg.checkpoint``); with ``resume=auto`` the
    same command in the same run directory continues from the newest complete one. A run
    stopped by SIGTERM/SIGINT returns ``{"preempted": ...}`` and writes no summary.
    ``extra_callbacks`` are instances added by drivers (e.g. the harness's FLOPs meter).
    ``algorithms`` and ``plan``: as :func:`build_trainer` takes them.

    The run directory is locked for the whole run (:class:`speedup.lock.RunLock`, held by rank
    0): the same command started twice raises :class:`~speedup.lock.RunLockedError` in the
    second, naming the first's PID, before it reads or writes anything there."""
    from speedup.checkpoint import unwritable
    from speedup.lock import main_process_lock

    _init_distributed(cfg)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    # One line now, not a traceback from the lock (which creates it) or after training.
    problem = distributed.broadcast_object(unwritable(run_dir) if distributed.is_main() else None)
    if problem is not None:
        raise ConfigError(f"run_dir: {run_dir}: cannot write there ({problem})")
    with main_process_lock(run_dir):
        return _run_locked(cfg, extra_callbacks, algorithms, plan)


def _run_locked(
    cfg: DictConfig,
    extra_callbacks: list,
    algorithms: list[Algorithm] | None = None,
    plan: Plan | None = None,
) -> dict[str, Any]:
    """:func:`run_config` once the run directory is locked."""
    from speedup.checkpoint import CheckpointSaver, check_folder, load_checkpoint
    from speedup.errors import NonFiniteLossError

    _init_distributed(cfg)
    main = distributed.is_main()  # only rank 0 logs and writes files
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    # The same command again after the run finished: report it, touch nothing (before any
    # logger exists: some create their files when built).
    finished = distributed.broadcast_object(_finished_run(cfg, run_dir) if main else None)
    if finished is not None:
        if main:
            print(
                f"{run_dir}: this run is already complete (step {finished.get('steps')}, "
                "summary.json); nothing was changed. To train it again: resume=never",
                file=sys.stderr,
            )
        return {**finished, "already_complete": True}
    metrics_path = run_dir / "metrics.jsonl"
    loggers: list[LoggerDestination] = []
    if main:  # JSONL always; the recipe's ``loggers:`` (csv, tensorboard, mlflow) besides
        loggers.append(JSONLLogger(metrics_path))
        section = cfg.get("loggers")
        chosen = OmegaConf.to_container(section) if section is not None else {}
        loggers.extend(build_loggers(chosen, run_dir))
    if cfg.progress_bar and main:
        loggers.append(ProgressBar())
    options = OmegaConf.to_container(cfg.checkpoint)
    folder = Path(options.pop("folder", None) or run_dir / "checkpoints")
    check_folder(folder)  # unwritable, or holding files speedup did not write: fail now
    resolved = OmegaConf.to_container(cfg, resolve=True)
    saver = CheckpointSaver(folder, **options, config=resolved, config_hash=config_hash(cfg))
    # Rank 0 picks the checkpoint (skipping damaged ones) and tells the others.
    resume_from, verified = _resume_point(cfg, folder) if main else (None, None)
    resume_from = distributed.broadcast_object(resume_from)
    if main and resume_from is None:
        # A fresh run of the same config gets a fresh log. Before the trainer exists: algorithms
        # log at INIT, and a logger that already opened the file must not write to a deleted one.
        metrics_path.unlink(missing_ok=True)
    # Bad data paths fail here, before any file is written.
    trainer = build_trainer(
        cfg,
        loggers,
        trace=cfg.trace,
        extra_callbacks=[saver, *extra_callbacks],
        algorithms=algorithms,
        plan=plan,
    )
    if resume_from is not None:
        meta = load_checkpoint(trainer, resume_from, verified)  # rank 0 hashed it already
        if main:
            _warn_if_config_differs(meta, cfg, resume_from)
            print(f"resuming from {resume_from}", file=sys.stderr)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_text = OmegaConf.to_yaml(cfg, resolve=True)
        (run_dir / "config.yaml").write_text(config_text, encoding="utf-8")
        if resume_from is None:
            trainer.logger.log_hyperparameters(resolved)
        else:  # drop what was logged after the checkpoint: the resumed run logs it again
            truncate_metrics(metrics_path, trainer.state.timestamp.batch)
    try:
        metrics = trainer.fit()
    except NonFiniteLossError as err:
        last = saver.last_saved or resume_from
        kept = f" The last good checkpoint is {last}." if last else " No checkpoint was saved."
        raise NonFiniteLossError(f"{err}{kept}", err.step) from None
    state = trainer.state
    if state.preempted:
        name = signal.Signals(saver.signal_received).name if saver.signal_received else "signal"
        return {
            "run_dir": str(run_dir),
            "preempted": name,
            "signal": saver.signal_received,
            "steps": state.timestamp.batch,
            "checkpoint": str(saver.last_saved) if saver.last_saved else None,
        }
    if cfg.trace and main:  # the engine's (event, algorithm/callback) calls, in order
        lines = (json.dumps({"event": e, "by": who}) for e, who in trainer.engine.trace)
        (run_dir / "trace.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ts = state.timestamp
    summary = {
        "recipe": cfg.recipe,
        "seed": cfg.seed,
        "run_dir": str(run_dir),
        "config_hash": config_hash(cfg),
        "steps": ts.batch,
        "epochs": ts.epoch,
        "samples": ts.sample,
        "tokens": ts.token,
        "train_time_s": round(ts.train_time_s, 4),
        "eval_time_s": round(ts.eval_time_s, 4),
        "metrics": metrics,
        "stopped_early": state.stop_requested,
        "stop_reason": state.stop_reason,
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "checkpoint": str(saver.last_saved) if saver.last_saved else None,
        "device": str(state.device),
        "processes": distributed.world_size(),
        "environment": environment(),
    }
    if main:
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        tmp.replace(run_dir / "summary.json")
    return summary


def _finished_run(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run of this config that already finished in ``run_dir``, or None.

    Finished means: ``summary.json`` (written only at the end) is there, for this config, and
    the newest complete checkpoint is the one it ended on (none written since, and that one
    intact: a damaged final checkpoint is redone from the one before, as any resume would).
    With ``resume=never`` or an explicit checkpoint the user asked to train, so it is never
    finished; a longer ``max_duration`` is another config, and continues from the last
    checkpoint."""
    from speedup.checkpoint import list_checkpoints, verified_latest

    if str(cfg.resume).strip() != "auto":
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("config_hash") != config_hash(cfg):
        return None
    folder = Path(cfg.checkpoint.get("folder") or run_dir / "checkpoints")
    ended_on = summary.get("checkpoint")
    if ended_on is None:  # a run without checkpoints: finished unless some were written since
        return summary if not list_checkpoints(folder) else None
    with warnings.catch_warnings():  # a damaged one is reported where the run resumes
        warnings.simplefilter("ignore")
        newest = verified_latest(folder)
    if newest is None or os.path.realpath(newest[0]) != os.path.realpath(ended_on):
        return None
    return summary


def _init_distributed(cfg: DictConfig) -> None:
    """Join torchrun's process group, if launched by it (idempotent)."""
    distributed.init("cpu" if cfg.device == "cpu" else None)


def _resume_point(cfg: DictConfig, folder: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """Where ``cfg.resume`` says to continue from (None: from scratch), with the checkpoint's
    meta when finding it already verified its hashes."""
    from speedup.checkpoint import resolve_checkpoint, verified_latest
    from speedup.errors import CheckpointError

    choice = str(cfg.resume).strip()
    if choice == "never":
        return None, None
    if choice == "auto":
        return verified_latest(folder) or (None, None)
    try:
        return resolve_checkpoint(choice), None
    except CheckpointError as err:
        raise CheckpointError(f"resume={choice}: {err}") from None


def _warn_if_config_differs(meta: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    saved = meta.get("config")
    if not isinstance(saved, dict) or meta.get("config_hash") == config_hash(cfg):
        return
    current = OmegaConf.to_container(cfg, resolve=True)
    keys = (set(saved) | set(current)) - set(NOT_TRAINING_KEYS)
    changed = sorted(k for k in keys if saved.get(k) != current.get(k))
    if changed:
        warnings.warn(
            f"resuming from {path}, saved by a run whose config differs in: "
            f"{', '.join(changed)}; training continues with the current values",
            stacklevel=3,
        )


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records logged at or before ``step`` (and drop a line cut short by a crash)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def run_recipe(
    recipe: str, overrides: list[str] | None = None, smoke: bool = False
) -> dict[str, Any]:
    """Train ``recipe`` (a shipped name or a YAML path) as ``speedup run`` does and return the
    summary (the dictionary saved as ``summary.json``).

    ``overrides`` are the command line's ``key=value`` and ``~key`` strings; its ``--smoke``
    flag is ``smoke=True`` here: ``run_recipe("quickstart", ["seed=3"], smoke=True)``."""
    flags = [o for o in overrides or [] if isinstance(o, str) and o.startswith("--")]
    if flags:  # a command-line flag among the overrides: say which keyword it is here
        hint = "pass smoke=True" if flags[0] == "--smoke" else "overrides are key=value or ~key"
        raise ConfigError(
            f"run_recipe: overrides: {flags[0]!r} is a command-line flag, not an override; {hint}"
        )
    cfg, algorithms = load_recipe(recipe, overrides, smoke=smoke)
    plan, _ = plan_config(cfg, algorithms)
    if plan.conflicts:  # before any data is loaded, as `speedup run` refuses it
        raise PlanError(plan.conflicts)
    return run_config(cfg, algorithms=algorithms, plan=plan)
