"""Optimizers by name (torch.optim, then torch-optimizer) and LR schedules written in Time.

A schedule is a pure function of the training time: the multiplier at a step depends only on
``state.timestamp`` and ``max_duration``, so resuming restores it exactly. The scale-schedule
ratio (SSR, Composer's "scale_schedule_ratio") stretches the run and every milestone by the
same factor: with ratio r, ``lr_r(t) = lr_1(t / r)``. Warmup is not stretched unless
``scale_warmup`` is set, as in Composer.
"""

from __future__ import annotations

import inspect
import math
import typing
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from speedup.arguments import type_problem, value_fits
from speedup.engine import long_time_constants
from speedup.registry import suggest
from speedup.time import Time, TimeUnit

if TYPE_CHECKING:
    from speedup.state import State

__all__ = [
    "DEFAULT_OPTIMIZER",
    "DEFAULT_SCHEDULER",
    "build_optimizer",
    "build_scheduler",
    "optimizer_argument_problem",
    "optimizer_class",
    "optimizer_names",
    "optimizer_problem",
    "SCHEDULES",
    "schedule_argument_types",
    "schedule_factor",
    "schedule_time_constants",
    "type_problem",
    "value_fits",
]

#: The optimizer and the schedule a run gets when it names none: the recipe schema's defaults
#: (``RunConfig``) and the Trainer's. Copy before changing (``dict(DEFAULT_OPTIMIZER)``).
DEFAULT_OPTIMIZER: dict[str, Any] = {"name": "sgd", "lr": 0.1}
DEFAULT_SCHEDULER: dict[str, Any] = {"name": "constant"}


def _torch_optimizers() -> dict[str, type]:
    classes = {}
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            if obj is not torch.optim.Optimizer:
                classes[name.lower()] = obj
    return classes


def _torch_optimizer_names() -> list[str]:
    try:
        import torch_optimizer
    except ImportError:  # optional at run time; declared as a dependency
        return []
    return sorted(torch_optimizer._NAME_OPTIM_MAP)  # the package's own name table


def optimizer_names() -> list[str]:
    return sorted(set(_torch_optimizers()) | set(_torch_optimizer_names()))


def optimizer_class(name: str) -> type:
    """The optimizer class named ``name`` (case-insensitive): torch.optim first."""
    key = name.lower()
    torch_classes = _torch_optimizers()
    if key in torch_classes:
        return torch_classes[key]
    if key in _torch_optimizer_names():
        import torch_optimizer

        return torch_optimizer.get(key)
    names = optimizer_names()
    raise ValueError(f"unknown optimizer {name!r}{suggest(key, names)}; available: {names}")


def optimizer_arguments(cls: type) -> list[str]:
    """The keyword arguments a recipe may give ``cls`` (all but ``params``, ``*args`` and
    ``**kwargs``)."""
    return [
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def optimizer_argument_problem(cls: type, args: dict[str, Any]) -> tuple[str | None, str] | None:
    """What is wrong with the names and types of ``args`` (an optimizer spec without its
    ``name``) for ``cls``, as ``(argument to blame or None, message)``; None when nothing is.
    Checked in this order: every name is an argument of ``cls``; every value fits its
    annotation (``lr: 'x'`` or ``lr: true`` where a float is expected is an error); no
    required argument is missing. Recipe validation and :func:`build_optimizer` both call
    it; the values themselves (a negative lr) are :func:`optimizer_problem`'s, or torch's."""
    allowed = optimizer_arguments(cls)
    for key in args:
        if key not in allowed:
            return key, (
                f"not an argument of {cls.__name__}{suggest(key, allowed)}; "
                f"allowed: {', '.join(allowed)}"
            )
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations (a plugin's): check names only
        hints = {}
    parameters = inspect.signature(cls.__init__).parameters
    for key, value in args.items():
        problem = type_problem(value, hints.get(key, parameters[key].annotation))
        if problem is not None:
            return key, problem
    missing = [n for n in allowed if parameters[n].default is parameters[n].empty and n not in args]
    if missing:  # lookahead wraps an optimizer object, which no recipe can give
        return None, f"missing required key(s) {', '.join(missing)}"
    return None


def optimizer_problem(cls: type, args: dict[str, Any]) -> tuple[str | None, str] | None:
    """Why ``cls(params, **args)`` would fail, found by building it over a dummy parameter
    (cheap, and it runs the optimizer's own value checks: a negative lr, betas outside
    [0, 1)), as ``(argument to blame or None, message)``; None when it builds.

    The argument to blame is the first one that fails on its own (with only the required
    arguments beside it), since torch's messages do not always name the argument."""

    def failure(kwargs: dict[str, Any]) -> str | None:
        # 2-D, since some optimizers (Muon) accept only matrices.
        param = torch.zeros(2, 2, requires_grad=True)
        try:
            cls([param], **kwargs)
        except (ValueError, TypeError, RuntimeError) as err:
            return str(err).splitlines()[0] if str(err) else type(err).__name__
        return None

    message = failure(args)
    if message is None:
        return None
    parameters = inspect.signature(cls.__init__).parameters
    required = {
        k: v
        for k, v in args.items()
        if k in parameters and parameters[k].default is parameters[k].empty
    }
    if failure(required) is None:
        for key, value in args.items():
            if key not in required and failure({**required, key: value}) is not None:
                return key, message
    return (next(iter(required)) if len(required) == 1 else None), message


def build_optimizer(
    params: Iterable[Any], spec: dict[str, Any] | None = None
) -> torch.optim.Optimizer:
    """``spec`` is ``{"name": "sgd", "lr": 0.1, "momentum": 0.9, ...}``; none (or ``{}``) is
    :data:`DEFAULT_OPTIMIZER`. Names and types are checked first
    (:func:`optimizer_argument_problem`), so the error names the key."""
    spec = dict(spec or DEFAULT_OPTIMIZER)
    cls = optimizer_class(spec.pop("name"))
    problem = optimizer_argument_problem(cls, spec)
    if problem is not None:
        key, message = problem
        raise ValueError(f"optimizer{'.' + key if key else ''}: {message}")
    return cls(params, **spec)


def _warmup_factor(step: float, warmup: float) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _constant(frac: float, step: float) -> float:
    return 1.0


def _linear(frac: float, step: float, start_factor: float = 1.0, end_factor: float = 0.0) -> float:
    return start_factor + (end_factor - start_factor) * frac


def _cosine(frac: float, step: float, alpha_f: float = 0.0) -> float:
    return alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * frac))


#: Cooldown shapes of the warmup-stable-decay schedule: the share of the peak left at
#: position ``p`` in [0, 1] of the cooldown (before the final factor is mixed in).
WSD_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1.0 - p,
    "sqrt": lambda p: 1.0 - math.sqrt(p),  # "1-sqrt", the better of the two in Hägele et al.
}


def _wsd(
    frac: float, step: float, decay: float = 0.2, shape: str = "sqrt", final_factor: float = 0.0
) -> float:
    """Warmup-stable-decay (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
    Beyond Fixed Training Durations", arXiv 2405.18392): the peak LR held constant,
    then a cooldown over the last ``decay`` fraction of the *whole* run (warmup included, as in
    the authors' ``wsd_schedule``) to ``final_factor`` of the peak, with shape ``linear`` or
    ``sqrt`` (``1 - sqrt(p)``). Their finding, and these defaults: a cooldown of about 20% of
    the steps matches or beats cosine, and ``1 - sqrt`` beats linear; their code defaults to
    10% and linear. The warmup is the project's (``scheduler.warmup``, linear from
    ``1/warmup``), where theirs starts at lr/100."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
        raise ValueError(
            f"scheduler.decay: the cooldown's share of the run, in (0, 1]; got {decay!r}"
        )
    if shape not in WSD_SHAPES:
        raise ValueError(
            f"scheduler.shape: unknown cooldown shape {shape!r}; allowed: {', '.join(WSD_SHAPES)}"
        )
    if (
        isinstance(final_factor, bool)
        or not isinstance(final_factor, (int, float))
        or not (0.0 <= final_factor <= 1.0)
    ):
        raise ValueError(
            f"scheduler.final_factor: the LR at the end as a share of the peak, in [0, 1]; "
            f"got {final_factor!r}"
        )
    # Rounded so that the run's last step lands exactly on the final factor (float noise
    # in frac - (1 - decay) would leave it a hair above).
    into_cooldown = round((frac - (1.0 - decay)) / decay, 12)
    if into_cooldown <= 0.0:
        return 1.0
    return final_factor + (1.0 - final_factor) * WSD_SHAPES[shape](min(1.0, into_cooldown))


#: name -> (factor function, the Time-valued arguments it takes)
SCHEDULES: dict[str, tuple[Callable[..., float], tuple[str, ...]]] = {
    "constant": (_constant, ()),
    "linear": (_linear, ()),
    "cosine": (_cosine, ()),
    "wsd": (_wsd, ()),
    "step": (None, ("step_size",)),  # type: ignore[dict-item]
    "multistep": (None, ("milestones",)),  # type: ignore[dict-item]
}


def schedule_arguments(name: str) -> list[str]:
    if name == "step":
        return ["step_size", "gamma"]
    if name == "multistep":
        return ["milestones", "gamma"]
    fn = SCHEDULES[name][0]
    return [p for p in inspect.signature(fn).parameters if p not in ("frac", "step")]


def schedule_argument_types(name: str) -> dict[str, Any]:
    """The non-Time arguments of schedule ``name`` -> their types (Time-valued ones, warmup,
    step_size and milestones, are parsed as Times instead)."""
    if name in ("step", "multistep"):
        return {"scale_warmup": bool, "gamma": float}
    hints = typing.get_type_hints(SCHEDULES[name][0])
    return {"scale_warmup": bool, **{k: hints.get(k, Any) for k in schedule_arguments(name)}}


def schedule_time_constants(spec: dict[str, Any] | None, ratio: float = 1.0) -> dict[str, Time]:
    """The schedule's warmup as a time constant for the planner (``{}`` without one), stretched
    by the scale-schedule ratio when ``scale_warmup`` asks for it, as :class:`_Schedule` does."""
    warmup = Time.parse(str((spec or {}).get("warmup", "0ba")))
    if warmup.value == 0:
        return {}
    if (spec or {}).get("scale_warmup", False) and warmup.unit != TimeUnit.DURATION:
        warmup = warmup * ratio
    return {"scheduler.warmup": warmup}


class _Schedule:
    """The LR multiplier as a function of the state's timestamp."""

    def __init__(self, spec: dict[str, Any], state: State, ratio: float) -> None:
        spec = dict(spec)
        self.name = spec.pop("name", DEFAULT_SCHEDULER["name"])
        if self.name not in SCHEDULES:
            raise ValueError(
                f"scheduler.name: unknown schedule {self.name!r}"
                f"{suggest(self.name, list(SCHEDULES))}; available: {', '.join(SCHEDULES)}"
            )
        converter = state.converter
        assert converter is not None, "the Trainer sets state.converter before schedules"
        allowed = schedule_arguments(self.name) + ["warmup", "scale_warmup"]
        for key in spec:
            if key not in allowed:
                raise ValueError(
                    f"scheduler.{key}: not an argument of the {self.name} schedule"
                    f"{suggest(key, allowed)}; allowed: {', '.join(allowed)}"
                )

        def batches(value: Any, stretch: bool = True) -> float:
            # max_duration is already scaled by the ratio, so 'dur' times stretch with it.
            time = Time.parse(value)
            factor = ratio if stretch and time.unit != TimeUnit.DURATION else 1.0
            return converter.to_batches(time) * factor

        self.state = state
        warmups = schedule_time_constants(spec, ratio)
        self.warmup = batches(spec.pop("warmup", "0ba"), stretch=spec.pop("scale_warmup", False))
        self.gamma = float(spec.pop("gamma", 0.1))
        if self.name == "step":
            self.step_size = batches(spec.pop("step_size", "1ep"))
        if self.name == "multistep":
            self.milestones = sorted(batches(m) for m in spec.pop("milestones", []))
        self.kwargs = spec
        md = state.max_duration
        self.total = None if md.unit == TimeUnit.SECOND else converter.to_batches(md)
        for message in long_time_constants(warmups, md, converter):
            warnings.warn(message, UserWarning, stacklevel=4)  # the LR never reaches its peak

    def __call__(self, _: int) -> float:
        return self.factor_at(self.state.timestamp.batch)

    def factor_at(self, batch: float) -> float:
        """The multiplier at a given batch count (LR rewinding replays earlier values)."""
        step = float(batch)
        if self.total is not None:
            frac = min(1.0, step / self.total) if self.total else 1.0
        else:  # a wall-clock run: only the elapsed fraction is known
            frac = self.state.elapsed_fraction
        warm = _warmup_factor(step, self.warmup)
        if self.name == "step":
            return warm * self.gamma ** math.floor(step / self.step_size)
        if self.name == "multistep":
            return warm * self.gamma ** sum(step >= m for m in self.milestones)
        if self.name == "wsd":  # its cooldown is a share of the whole run: warmup does not
            return warm * _wsd(frac, step, **self.kwargs)  # restart its clock (Hägele et al.)
        if self.warmup > 0:
            if step < self.warmup:
                return warm
            if self.total is not None:  # decay over the post-warmup part, ending at its floor
                frac = min(1.0, (step - self.warmup) / max(1.0, self.total - self.warmup))
        return warm * SCHEDULES[self.name][0](frac, step, **self.kwargs)


def schedule_factor(spec: dict[str, Any], state: State, ratio: float = 1.0) -> _Schedule:
    """The multiplier function for ``spec``; exposed for tests and plots."""
    return _Schedule(spec, state, ratio)


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: dict[str, Any] | None, state: State, ratio: float = 1.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per batch, its multiplier read from the timestamp."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, _Schedule(spec or DEFAULT_SCHEDULER, state, ratio)
    )
