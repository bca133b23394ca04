"""Algorithms: speedups that act on events, and declare, as data, what they do.

An algorithm subclasses :class:`Algorithm`, sets ``name`` (its registry name) and returns a
:class:`Declaration` from :meth:`Algorithm.declare`::

    class LabelSmoothing(Algorithm):
        name = "label_smoothing"

        def declare(self) -> Declaration:
            return Declaration(
                events={Event.BEFORE_LOSS: Access(reads={"batch.targets"},
                                                  writes={"batch.targets"})},
                data_kinds={"image", "sequence"},
            )

        def apply(self, event: Event, state: State, logger: Logger) -> None:
            state.batch["targets"] = smooth_labels(state.batch["targets"], ...)

The engine uses declarations to order algorithms at each event, to find conflicts before
training, and to dispatch each event only to the algorithms that declared it.

**Functional twins.** Every algorithm's module also exports a plain function doing the same
math on tensors or modules (``smooth_labels(targets, num_classes, alpha)``), usable in any
PyTorch loop; the Algorithm class is a thin scheduler around it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard

from speedup.event import Event

if TYPE_CHECKING:
    from speedup.logger import Logger
    from speedup.registry import Registry
    from speedup.state import State
    from speedup.time import Time

__all__ = [
    "Access",
    "Algorithm",
    "Declaration",
    "SEARCH_TYPES",
    "build_algorithms",
    "STATE_FIELDS",
    "check_field",
    "check_search_space",
]

#: The state fields an algorithm may declare. ``batch.<key>`` names any batch key.
STATE_FIELDS: dict[str, str] = {
    "batch": "the whole batch dict (any key)",
    "outputs": "model outputs of the current (micro)batch",
    "loss": "the current microbatch's loss",
    "model.modules": "the module structure (surgery: replacing or adding modules)",
    "model.weights": "parameter and buffer values",
    "model.grads": "parameter .grad tensors",
    "model.mode": "train/eval mode, requires_grad flags",
    "masks": "pruning masks (state.masks) and when they last changed",
    "optimizer": "the optimizer object or its param groups",
    "lr": "learning rates in the optimizer's param groups",
    "scheduler": "the LR schedulers",
    "dataloader": "the train dataloader or its dataset",
    "timestamp": "the training time counters",
    "max_duration": "the run length",
    "eval_metrics": "finished evaluation metrics",
    "stop": "the stop-training flag",
    "precision": "the autocast precision",
}


def check_field(name: str) -> str:
    """Return ``name`` if it is a known state field, else raise ValueError listing them."""
    if name in STATE_FIELDS or (name.startswith("batch.") and len(name) > len("batch.")):
        return name
    allowed = ", ".join(sorted(STATE_FIELDS)) + ", batch.<key>"
    raise ValueError(f"unknown state field {name!r}; allowed: {allowed}")


@dataclass(frozen=True)
class Access:
    """What an algorithm reads and writes at one event."""

    reads: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()

    def __init__(self, reads: Iterable[str] = (), writes: Iterable[str] = ()) -> None:
        object.__setattr__(self, "reads", frozenset(check_field(f) for f in reads))
        object.__setattr__(self, "writes", frozenset(check_field(f) for f in writes))


def _writes_overlap(a: frozenset[str], b: frozenset[str]) -> set[str]:
    """Fields written by both; ``batch`` overlaps every ``batch.<key>``."""
    common = set(a & b)
    for x, y in ((a, b), (b, a)):
        if "batch" in x:
            common |= {f for f in y if f.startswith("batch.")}
    return common


@dataclass(frozen=True)
class Declaration:
    """What an algorithm does, as data the engine can plan with.

    ``events`` maps each event the algorithm acts on to the fields it reads and writes there.
    ``runs_before``/``runs_after`` name other algorithms (by registry name) that, when both are
    present, must come later/earlier at every event they share. ``incompatible_with`` names
    algorithms that must never be combined with this one. ``model_kinds``/``data_kinds`` limit
    where it applies (``None`` means anywhere); the engine checks them against the model's
    ``kind`` and the data's ``kind``.
    """

    events: Mapping[Event, Access] = field(default_factory=dict)
    runs_before: frozenset[str] = frozenset()
    runs_after: frozenset[str] = frozenset()
    incompatible_with: frozenset[str] = frozenset()
    model_kinds: frozenset[str] | None = None
    data_kinds: frozenset[str] | None = None
    #: Some trainable parameters may get no gradient in a step (frozen layers, dropped
    #: blocks): distributed data parallelism must then look for them each step
    #: (DDP's ``find_unused_parameters``), which costs a graph traversal, so it is opt-in.
    unused_parameters: bool = False

    def __post_init__(self) -> None:
        for key in ("runs_before", "runs_after", "incompatible_with"):
            object.__setattr__(self, key, frozenset(getattr(self, key)))
        for key in ("model_kinds", "data_kinds"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, frozenset(value))
        object.__setattr__(self, "events", {Event(e): a for e, a in dict(self.events).items()})

    def writes_at(self, event: Event) -> frozenset[str]:
        access = self.events.get(event)
        return access.writes if access else frozenset()


#: The kinds of searchable argument (``speedup tune``), as Optuna's ``suggest_*`` know them.
SEARCH_TYPES = ("float", "int", "categorical")
_SEARCH_KEYS = {"type", "low", "high", "log", "choices", "unit"}
_TIME_UNITS = ("ep", "ba", "sp", "tok", "dur")


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_search_space(cls: type, space: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """``space`` validated against ``cls``'s constructor, as plain dicts; ValueError naming the
    algorithm, the argument and what is allowed otherwise.

    Each entry is ``{type: float|int, low, high, log}`` or ``{type: categorical, choices}``;
    ``unit`` (a Time unit such as ``dur``) turns a sampled number into a Time string, for
    schedule arguments (``delay: {type: float, low: 0.2, high: 0.7, unit: dur}`` -> "0.45dur")."""
    who = getattr(cls, "name", "") or cls.__name__
    # mypy calls ``__init__`` on a bare ``type`` unsound (a subclass may change it): reading
    # the subclass's own constructor is the point here, as config validation does.
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    accepted = [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL,)]
    out: dict[str, dict] = {}
    for arg, spec in dict(space).items():
        where = f"{who}.SEARCH_SPACE[{arg!r}]"
        if arg not in accepted and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"{where}: {who} has no argument {arg!r}; its arguments: {accepted}")
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping such as {{type: float, low, high}}")
        spec = dict(spec)
        unknown = sorted(set(spec) - _SEARCH_KEYS)
        if unknown:
            allowed = sorted(_SEARCH_KEYS)
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {allowed}")
        kind = spec.get("type")
        if kind not in SEARCH_TYPES:
            kinds = ", ".join(SEARCH_TYPES)
            raise ValueError(f"{where}: type must be one of {kinds}, got {kind!r}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ValueError(f"{where}: categorical needs a non-empty list of choices")
            spec["choices"] = list(choices)
        else:
            low, high = spec.get("low"), spec.get("high")
            if not (_number(low) and _number(high) and low < high):
                raise ValueError(f"{where}: needs numbers low < high, got low={low}, high={high}")
            if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
                raise ValueError(f"{where}: an int range needs whole-number bounds")
            spec["log"] = bool(spec.get("log", False))
            if spec["log"] and low <= 0:
                raise ValueError(f"{where}: a log range needs low > 0, got {low}")
        if "unit" in spec and spec["unit"] not in _TIME_UNITS:
            raise ValueError(f"{where}: unit must be one of {', '.join(_TIME_UNITS)}")
        out[arg] = spec
    return out


class Algorithm:
    """Base class of every speedup. Subclasses set ``name`` and implement ``declare``/``apply``.

    ``match`` is asked only at events the algorithm declared; it returns False to skip a
    firing (e.g. outside the algorithm's schedule). ``state_dict``/``load_state_dict`` carry
    whatever the algorithm needs for an exact resume (tensors and plain containers only).
    """

    name: ClassVar[str] = ""
    #: The arguments worth searching and their ranges, for ``speedup tune`` (data, validated by
    #: :meth:`search_space`). None: not offered to the tuner; ``{}``: offered with its
    #: defaults only (an on/off choice).
    SEARCH_SPACE: ClassVar[Mapping[str, Mapping[str, Any]] | None] = None
    #: Recipe sections this algorithm needs set to a value (top-level key -> the section's
    #: whole new value), e.g. ``{"scheduler": {"name": "constant"}}`` for an algorithm that
    #: replaces the LR schedule. The tuner applies them when it switches the algorithm on;
    #: a plain run still refuses a recipe that breaks them, with the algorithm's own message.
    REQUIRES_CONFIG: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def search_space(cls) -> dict[str, dict] | None:
        """:attr:`SEARCH_SPACE`, validated (:func:`check_search_space`); None if undeclared."""
        if cls.SEARCH_SPACE is None:
            return None
        return check_search_space(cls, cls.SEARCH_SPACE)

    def declare(self) -> Declaration:
        raise NotImplementedError(f"{type(self).__name__} must declare what it does")

    def match(self, event: Event, state: State) -> bool:
        return True

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        raise NotImplementedError

    def exported_weights(self, weights: dict[str, Any]) -> dict[str, Any]:
        """The weights a plain network (without this algorithm) needs to compute what the
        trained one computes; ``speedup export`` applies it. Default: unchanged. Algorithms
        that reparametrise weights (weight standardisation) override it."""
        return weights

    def time_constants(self) -> dict[str, Time]:
        """The algorithm's own time scales (a half-life, a delay before it starts, a warmup),
        by argument name. The planner warns when one is longer than the whole run: the
        algorithm would then never do what its arguments describe (an EMA with a 1000-batch
        half-life over a 125-batch run ends still mostly the initial weights). Default: none."""
        return {}

    def check_composition(self, algorithms: Mapping[str, Algorithm]) -> list[str]:
        """Problems with this algorithm's arguments given the others present (e.g. a rewind
        point after the pruning time). Each message becomes a plan conflict."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _algorithm_registry() -> Registry[type[Algorithm]]:  # lazily: the core stays cheap to import
    from speedup.registry import Registry

    return Registry("algorithm", group="speedup.algorithms")


#: Algorithms by name. Built-ins and plugins alike register through the entry-point group
#: ``speedup.algorithms`` (see pyproject.toml); tests and notebooks may also call
#: ``ALGORITHMS.register(name)(cls)``.
ALGORITHMS = _algorithm_registry()


def build_algorithm(name: str, args: Mapping[str, Any] | None = None) -> Algorithm:
    """The registered algorithm ``name`` built with ``args`` (``None``: its defaults): the one
    place a recipe's algorithms are made. Raises UnknownNameError for an unregistered name and
    the constructor's ValueError/TypeError for arguments it refuses."""
    return ALGORITHMS.get(name)(**dict(args or {}))


def build_algorithms(spec: Mapping[str, Mapping[str, Any] | None]) -> list[Algorithm]:
    """The algorithms of a recipe's ``algorithms`` section (name -> arguments, ``None`` or
    ``{}`` for the defaults), each by :func:`build_algorithm`, in their order. Callers that
    plan and then train pass the same objects on (see :func:`speedup.config.load_recipe`)."""
    return [build_algorithm(name, args) for name, args in spec.items()]
