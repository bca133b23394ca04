"""The engine: turns declarations into a per-event plan, then dispatches events by it.

At fit start the engine builds a :class:`Plan`. For each event, the algorithms that declared it
are ordered so every ``runs_before``/``runs_after`` constraint holds; ties keep recipe order,
reversed at ``after_*`` events so that paired before/after hooks nest (A, B ... B, A). The plan
also lists every conflict:

* two algorithms write one field at one event and neither is ordered before the other;
* a declared incompatibility between two present algorithms;
* an algorithm whose ``model_kinds``/``data_kinds`` exclude this model or data;
* an ordering cycle;
* a problem an algorithm finds in its arguments given the others (``check_composition``).

An ordering constraint naming an algorithm that is not registered is only a warning: it may
name a plugin that is not installed.

Conflicts are errors by default (:class:`PlanError`). At run time each event goes only to the
algorithms planned for it, then to callbacks that hook it, then to loggers.

**Declaration checks.** ``Engine(..., check_declarations=True)`` (or any Engine built inside
``with checking_declarations():``, or with the environment variable
``SPEEDUP_CHECK_DECLARATIONS=1``) raises :class:`ConformanceError` when an algorithm changes
a field outside that event's ``writes``; the machinery is :mod:`speedup.conformance` (a
testing aid). Off, the dispatch tables are exactly the plain ones.
"""

from __future__ import annotations

import heapq
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from speedup.algorithm import Algorithm, Declaration, _writes_overlap
from speedup.callback import Callback
from speedup.conformance import (
    checked_apply,
    checking_declarations,
    declarations_checked_by_default,
)
from speedup.errors import ConformanceError, PlanError
from speedup.event import Event
from speedup.time import Time, TimeConverter, TimeUnit

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "ConformanceError",
    "Conflict",
    "Engine",
    "Plan",
    "PlanError",
    "algorithm_time_constants",
    "build_plan",
    "checking_declarations",
    "long_time_constants",
]


@dataclass(frozen=True)
class Conflict:
    kind: str  # write-write, incompatible, not-applicable, cycle, unknown-name, invalid
    algorithms: tuple[str, ...]
    event: Event | None = None
    field: str | None = None
    message: str = ""

    def __str__(self) -> str:
        return self.message


@dataclass
class Plan:
    """Per-event order of algorithm names, and the conflicts found.

    ``algorithms``, ``model_kind`` and ``data_kind`` record what was planned, so that a plan
    made before the data is built (``speedup plan``, ``speedup run``) is handed to the
    :class:`Engine` and used as is when it trains the same algorithms on the same kinds."""

    order: dict[Event, list[str]] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    algorithms: tuple[str, ...] = ()
    model_kind: str | None = None
    data_kind: str | None = None

    def made_for(
        self, algorithms: Sequence[str], model_kind: str | None, data_kind: str | None
    ) -> bool:
        """Whether this plan was made for these algorithm names, in this order, on these
        model and data kinds (the plan depends on nothing else but their declarations)."""
        return (tuple(algorithms), model_kind, data_kind) == (
            self.algorithms,
            self.model_kind,
            self.data_kind,
        )

    def format(self, declarations: dict[str, Declaration] | None = None) -> str:
        """A human-readable table, as ``speedup plan`` prints it."""
        lines = []
        for event in Event:
            names = self.order.get(event)
            if not names:
                continue
            lines.append(f"{event.name}:")
            for i, name in enumerate(names, 1):
                access = declarations[name].events[event] if declarations else None
                detail = ""
                if access is not None:
                    reads = ",".join(sorted(access.reads)) or "-"
                    writes = ",".join(sorted(access.writes)) or "-"
                    detail = f"  reads {reads}  writes {writes}"
                lines.append(f"  {i}. {name}{detail}")
        if not lines:
            lines.append("(no algorithms)")
        lines.append("")
        lines.extend(f"warning: {w}" for w in self.warnings)
        if self.conflicts:
            lines.append(f"CONFLICTS ({len(self.conflicts)}):")
            lines.extend(f"  - {c}" for c in self.conflicts)
        else:
            lines.append("no conflicts")
        return "\n".join(lines)


def _ordered_pairs(names: list[str], decls: dict[str, Declaration]) -> set[tuple[str, str]]:
    """Declared (earlier, later) pairs among the present algorithms."""
    present = set(names)
    pairs = set()
    for name in names:
        for other in decls[name].runs_before & present:
            pairs.add((name, other))
        for other in decls[name].runs_after & present:
            pairs.add((other, name))
    return pairs


def _order_event(
    names: list[str], pairs: set[tuple[str, str]], reverse_ties: bool
) -> tuple[list[str], bool]:
    """Kahn's topological sort with recipe position as the tie-break. Returns (order, cyclic)."""
    position = {n: (-i if reverse_ties else i) for i, n in enumerate(names)}
    after: dict[str, list[str]] = {n: [] for n in names}
    indegree = dict.fromkeys(names, 0)
    for earlier, later in pairs:
        if earlier in after and later in after:
            after[earlier].append(later)
            indegree[later] += 1
    ready = [(position[n], n) for n in names if indegree[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for nxt in after[name]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                heapq.heappush(ready, (position[nxt], nxt))
    if len(order) < len(names):  # a cycle: keep going with recipe order so a plan still prints
        order += [n for n in names if n not in order]
        return order, True
    return order, False


def _reachable(pairs: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Transitive closure: A before B before C orders A before C."""
    closure = set(pairs)
    changed = True
    while changed:
        changed = False
        for a, b in list(closure):
            for c, d in list(closure):
                if b == c and (a, d) not in closure:
                    closure.add((a, d))
                    changed = True
    return closure


def algorithm_time_constants(algorithms: Sequence[Algorithm]) -> dict[str, Time]:
    """Every algorithm's declared time constants, keyed as in a recipe
    (``algorithms.ema.half_life``)."""
    return {
        f"algorithms.{a.name}.{key}": time
        for a in algorithms
        for key, time in a.time_constants().items()
    }


def _in_batches(
    time: Time, converter: TimeConverter | None, batch_size: int | None
) -> float | None:
    """``time`` in batches where that is known: everything given the run's converter; batches
    and samples given only the batch size (before the data is built); else None."""
    if converter is not None:
        try:
            return converter.to_batches(time)
        except ValueError:  # wall-clock, or tokens of data that has none
            return None
    if time.unit == TimeUnit.BATCH:
        return float(time.value)
    if time.unit == TimeUnit.SAMPLE and batch_size:
        return time.value / batch_size
    return None


def long_time_constants(
    constants: Mapping[str, Time],
    max_duration: Time,
    converter: TimeConverter | None = None,
    batch_size: int | None = None,
) -> list[str]:
    """A warning for each time constant (``key -> Time``) longer than the run.

    Compared in one unit where the units allow it: ``dur`` against 1, the same unit directly,
    otherwise in batches, through ``converter`` once the data is built or, before that, the
    batch size (epochs need the dataset's length, so those wait for the run)."""
    found = []
    for key, time in constants.items():
        if time.unit == TimeUnit.DURATION:
            longer, shown = time.value > 1, ""
        elif time.unit == max_duration.unit:
            longer, shown = time.value > max_duration.value, ""
        else:
            mine = _in_batches(time, converter, batch_size)
            run = _in_batches(max_duration, converter, batch_size)
            if mine is None or run is None:
                continue
            longer, shown = mine > run, f" ({mine:g}ba against {run:g}ba)"
        if longer:
            found.append(
                f"{key}: {time} is longer than the whole run (max_duration {max_duration})"
                f"{shown}, so it never plays out as set; shorten it or train longer"
            )
    return found


def build_plan(
    declarations: dict[str, Declaration],
    model_kind: str | None = None,
    data_kind: str | None = None,
    known_names: set[str] | None = None,
    algorithms: Sequence[Algorithm] = (),
    max_duration: Time | None = None,
    converter: TimeConverter | None = None,
    batch_size: int | None = None,
) -> Plan:
    """Plan the algorithms ``declarations`` (name -> Declaration, in recipe order).

    ``algorithms`` (the instances), when given, are also asked ``check_composition``; with
    ``max_duration`` their time constants longer than the run become warnings (see
    :func:`long_time_constants` for ``converter`` and ``batch_size``)."""
    names = list(declarations)
    plan = Plan(algorithms=tuple(names), model_kind=model_kind, data_kind=data_kind)
    if max_duration is not None:
        plan.warnings.extend(
            long_time_constants(
                algorithm_time_constants(algorithms), max_duration, converter, batch_size
            )
        )
    by_name = {a.name: a for a in algorithms}
    for algorithm in algorithms:
        for problem in algorithm.check_composition(by_name):
            plan.conflicts.append(
                Conflict("invalid", (algorithm.name,), message=f"{algorithm.name}: {problem}")
            )
    pairs = _ordered_pairs(names, declarations)
    closure = _reachable(pairs)
    seen_incompatible = set()
    for name in names:
        decl = declarations[name]
        for other in sorted(decl.incompatible_with & set(names)):
            key = frozenset((name, other))
            if key not in seen_incompatible:
                seen_incompatible.add(key)
                plan.conflicts.append(
                    Conflict(
                        "incompatible",
                        (name, other),
                        message=f"{name} and {other} are declared incompatible",
                    )
                )
        checks = (("model", model_kind, decl.model_kinds), ("data", data_kind, decl.data_kinds))
        for what, actual, allowed in checks:
            if actual is not None and allowed is not None and actual not in allowed:
                plan.conflicts.append(
                    Conflict(
                        "not-applicable",
                        (name,),
                        message=f"{name} does not apply to {what} kind {actual!r} "
                        f"(it applies to: {', '.join(sorted(allowed))})",
                    )
                )
        if known_names is not None:  # a typo, or a plugin that is not installed: not fatal
            for other in sorted((decl.runs_before | decl.runs_after) - known_names):
                plan.warnings.append(
                    f"{name} declares an order relative to {other!r}, "
                    "which is not a registered algorithm"
                )
    for event in Event:
        present = [n for n in names if event in declarations[n].events]
        if not present:
            continue
        order, cyclic = _order_event(present, pairs, reverse_ties=event.is_after)
        plan.order[event] = order
        if cyclic:
            plan.conflicts.append(
                Conflict(
                    "cycle",
                    tuple(present),
                    event,
                    message=f"at {event.name}: runs_before/runs_after form a cycle among "
                    f"{', '.join(present)}",
                )
            )
        for i, a in enumerate(present):
            for b in present[i + 1 :]:
                if (a, b) in closure or (b, a) in closure:
                    continue
                common = _writes_overlap(
                    declarations[a].writes_at(event), declarations[b].writes_at(event)
                )
                for field_name in sorted(common):
                    plan.conflicts.append(
                        Conflict(
                            "write-write",
                            (a, b),
                            event,
                            field_name,
                            message=f"{a} and {b} both write {field_name} at {event.name} "
                            f"with no declared order: add runs_before/runs_after to one of them",
                        )
                    )
    return plan


class Engine:
    """Dispatches events to planned algorithms, then callbacks, then loggers.

    ``trace=True`` records every (event, name) call in ``self.trace``, algorithms and
    callbacks alike, for debugging and for the event-order tests. ``check_declarations=True``
    checks every algorithm call against its declaration (None: the default of
    :func:`checking_declarations` or ``SPEEDUP_CHECK_DECLARATIONS``).
    """

    def __init__(
        self,
        state: State,
        logger: Logger,
        algorithms: Sequence[Algorithm] = (),
        callbacks: Sequence[Callback] = (),
        trace: bool = False,
        check_declarations: bool | None = None,
    ) -> None:
        self.state = state
        self.logger = logger
        self.algorithms = list(algorithms)
        self.callbacks = list(callbacks)
        self.tracing = trace
        if check_declarations is None:  # the context's default, then the environment's
            check_declarations = declarations_checked_by_default()
        #: Raise :class:`ConformanceError` when an algorithm changes a field it did not
        #: declare as written at the event (see the module docstring).
        self.check_declarations = check_declarations
        self.trace: list[tuple[str, str]] = []
        self.plan = Plan()
        self._dispatch: dict[Event, list[tuple[str, Any, Any]]] = {}

    def declarations(self) -> dict[str, Declaration]:
        names = [a.name for a in self.algorithms]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise PlanError(
                [
                    Conflict("duplicate", (n,), message=f"algorithm {n} is listed twice")
                    for n in sorted(duplicates)
                ]
            )
        return {a.name: a.declare() for a in self.algorithms}

    def compile(
        self,
        model_kind: str | None = None,
        data_kind: str | None = None,
        strict: bool = True,
        plan: Plan | None = None,
    ) -> Plan:
        """Build the plan and the dispatch tables. Raises PlanError on conflicts if strict.

        ``plan``, made by :func:`build_plan` for these algorithms before the data was built
        (:func:`speedup.run.plan_config`), is used as is when it was made for the same names
        and kinds (:meth:`Plan.made_for`); otherwise the engine plans them itself."""
        declarations = self.declarations()  # duplicate names fail here either way
        if plan is not None and plan.made_for(list(declarations), model_kind, data_kind):
            self.plan = plan
        else:
            self.plan = build_plan(declarations, model_kind, data_kind, algorithms=self.algorithms)
        if self.plan.conflicts and strict:
            raise PlanError(self.plan.conflicts)
        max_duration = getattr(self.state, "max_duration", None)
        if max_duration is not None:  # exact now: the state's converter knows the epoch length
            constants = algorithm_time_constants(self.algorithms)
            converter = getattr(self.state, "converter", None)
            for message in long_time_constants(constants, max_duration, converter):
                if message not in self.plan.warnings:  # a reused plan may hold it already
                    self.plan.warnings.append(message)
                warnings.warn(message, UserWarning, stacklevel=3)
        by_name = {a.name: a for a in self.algorithms}
        hooks = [(type(c).__name__, c.hooks()) for c in self.callbacks]  # once per callback
        self._dispatch = {}
        for event in Event:
            targets: list[tuple[str, Any, Any]] = [
                (name, by_name[name].match, self._apply_of(by_name[name], event))
                for name in self.plan.order.get(event, [])
            ]
            for name, by_event in hooks:
                if event in by_event:
                    targets.append((name, None, by_event[event]))
            if targets:
                self._dispatch[event] = targets
        return self.plan

    def _apply_of(self, algorithm: Algorithm, event: Event) -> Callable[..., None]:
        """The bound ``apply``, or, in check mode, a wrapper checking its declared writes."""
        if not self.check_declarations:
            return algorithm.apply
        return checked_apply(algorithm, event, algorithm.declare().writes_at(event))

    def run(self, event: Event) -> None:
        targets = self._dispatch.get(event)
        if not targets:
            return
        state, logger = self.state, self.logger
        for name, match, apply in targets:
            if match is None:  # a callback hook
                if self.tracing:
                    self.trace.append((event.value, name))
                apply(state, logger)
            elif match(event, state):
                if self.tracing:
                    self.trace.append((event.value, name))
                apply(event, state, logger)
