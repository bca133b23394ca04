"""The search space of ``speedup tune``, built from what the algorithms declare.

Each algorithm declares the arguments worth searching (``Algorithm.SEARCH_SPACE``, validated by
:func:`speedup.algorithm.check_search_space`). The space of a workload is: which of the
algorithms that *apply* to its model and data kinds are on, their declared arguments, the
learning rate, the optimizer (when several are offered) and the training budget as a
scale-schedule ratio. A shorter budget compresses the *whole* schedule (warmup and decay
included), so every budget ends fully decayed: Kaddour et al. 2023 (arXiv 2307.06440) found
that efficient-training gains vanish against such a baseline, and that mid-schedule
comparisons inflate them.

A sampled composition that the engine plans as conflicting is never trained: :func:`suggest`
raises :class:`Infeasible` and the objective turns it into a pruned trial.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from speedup.config import with_changes
from speedup.errors import ConfigError, Infeasible

__all__ = ["Infeasible", "Space", "algorithm_space", "applicable_algorithms", "suggest"]


def algorithm_space(name: str) -> dict[str, dict] | None:
    """The validated search space an algorithm declares (None: not offered to the tuner).

    A bad declaration is a :class:`ConfigError` (the CLI's exit 2) naming the algorithm."""
    from speedup.algorithm import ALGORITHMS

    try:
        return ALGORITHMS.get(name).search_space()
    except ValueError as err:
        raise ConfigError(f"search space: {err}") from None


def applicable_algorithms(cfg: DictConfig, names: list[str] | None = None) -> list[str]:
    """The algorithms (all declared ones, or ``names``) that declare a search space and that
    the engine plans without conflict on this workload when used alone, in name order."""
    from speedup.algorithm import ALGORITHMS
    from speedup.run import plan_config

    chosen = sorted(ALGORITHMS.names()) if names is None else list(names)
    kept = []
    for name in chosen:
        space = algorithm_space(name)
        if space is None:
            if names is not None:  # asked for by name: say why it cannot be searched
                raise ConfigError(f"tune: algorithm {name!r} declares no SEARCH_SPACE")
            continue
        try:
            plan, _ = plan_config(with_changes(cfg, algorithms={name: {}}))
            problem = "; ".join(str(c) for c in plan.conflicts)
        except (ValueError, TypeError) as err:  # needs arguments the defaults do not give
            problem = str(err)
        if not problem:
            kept.append(name)
        elif names is not None:
            raise ConfigError(f"--algorithms: {name} cannot run on this workload: {problem}")
    return kept


@dataclass
class Space:
    """What one study searches. ``algorithms`` empty: the baseline's space (LR and budget).

    ``budget`` is the range of the scale-schedule ratio; ``(1.0, 1.0)`` fixes the full budget
    (the baseline's quality phase). ``lr`` is a (low, high) log range."""

    algorithms: dict[str, dict[str, dict]] = field(default_factory=dict)
    lr: tuple[float, float] = (1e-3, 1e-1)
    budget: tuple[float, float] = (0.25, 1.0)
    optimizers: list[str] = field(default_factory=list)

    @classmethod
    def for_workload(
        cls,
        cfg: DictConfig,
        algorithms: list[str] | None = None,
        lr_factor: float = 10.0,
        budget: tuple[float, float] = (0.25, 1.0),
        optimizers: list[str] | None = None,
    ) -> Space:
        """The space around the recipe: LR within ``lr_factor`` of the recipe's either way."""
        lr = float(cfg.optimizer.lr)
        names = applicable_algorithms(cfg, algorithms)
        return cls(
            algorithms={n: algorithm_space(n) or {} for n in names},
            lr=(lr / lr_factor, lr * lr_factor),
            budget=budget,
            optimizers=list(optimizers or []),
        )

    def baseline(self) -> Space:
        """The same LR, optimizer and budget ranges without any algorithm (tuning parity)."""
        return Space({}, self.lr, self.budget, list(self.optimizers))


def _suggest_arg(trial: Any, key: str, spec: dict) -> Any:
    if spec["type"] == "categorical":
        value = trial.suggest_categorical(key, spec["choices"])
    elif spec["type"] == "int":
        value = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=spec["log"])
    else:
        value = trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"])
    if "unit" in spec:
        return f"{value:.4g}{spec['unit']}"
    return value


def _require(changes: dict[str, Any], name: str) -> None:
    """Apply the recipe sections algorithm ``name`` needs (its ``REQUIRES_CONFIG``); two
    algorithms that need one section set differently cannot be trained together."""
    from speedup.algorithm import ALGORITHMS

    for key, value in ALGORITHMS.get(name).REQUIRES_CONFIG.items():
        if key in changes and changes[key] != value:
            raise Infeasible(f"{name} needs {key}={value}, another algorithm {changes[key]}")
        changes[key] = value


def suggest(trial: Any, space: Space, cfg: DictConfig) -> dict[str, Any]:
    """Sample one configuration from ``space`` as ``with_changes`` keys for ``cfg``.

    Parameter names: ``lr``, ``budget``, ``optimizer``, ``use.<algorithm>`` and
    ``<algorithm>.<argument>`` (only sampled when the algorithm is on: a conditional space,
    which TPE handles with ``multivariate=True, group=True``). Raises :class:`Infeasible`
    when the engine plans the composition as conflicting."""
    from speedup.run import plan_config

    changes: dict[str, Any] = {}
    if space.optimizers:
        changes["optimizer"] = {
            **OmegaConf.to_container(cfg.optimizer),
            "name": trial.suggest_categorical("optimizer", space.optimizers),
        }
    changes["optimizer.lr"] = trial.suggest_float("lr", *space.lr, log=True)
    low, high = space.budget
    changes["scale_schedule_ratio"] = (
        trial.suggest_float("budget", low, high) if high > low else float(high)
    )
    algorithms = dict(OmegaConf.to_container(cfg.algorithms))
    for name, args in space.algorithms.items():
        if trial.suggest_categorical(f"use.{name}", [False, True]):
            algorithms[name] = {a: _suggest_arg(trial, f"{name}.{a}", s) for a, s in args.items()}
            _require(changes, name)
    changes["algorithms"] = algorithms
    if algorithms:
        try:
            plan, _ = plan_config(with_changes(cfg, **changes))
        except (ValueError, TypeError) as err:  # an argument combination the class refuses
            raise Infeasible(str(err)) from None
        if plan.conflicts:
            raise Infeasible("; ".join(str(c) for c in plan.conflicts))
    return changes
