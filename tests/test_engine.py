"""The engine's plan: ordering by declarations, conflicts, and dispatch."""

from collections.abc import Collection
from dataclasses import dataclass, field

import pytest

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.engine import Engine, PlanError, build_plan
from speedup.event import Event
from speedup.loggers import Logger

B, AL = Event.BEFORE_LOSS, Event.AFTER_LOSS


def decl(events=None, **kw) -> Declaration:
    return Declaration(events=events or {}, **kw)


def writes(*fields):
    return Access(writes=fields)


def test_order_follows_runs_before_and_after_not_recipe_order():
    plan = build_plan(
        {
            "c": decl({B: writes("batch.targets")}, runs_after={"b"}),
            "a": decl({B: writes("loss")}, runs_before={"b"}),
            "b": decl({B: writes("batch.inputs")}),
        }
    )
    assert plan.order[B] == ["a", "b", "c"]
    assert plan.conflicts == []


def test_ties_keep_recipe_order_and_reverse_at_after_events():
    plan = build_plan(
        {"x": decl({B: Access(), AL: Access()}), "y": decl({B: Access(), AL: Access()})}
    )
    assert plan.order[B] == ["x", "y"]
    assert plan.order[AL] == ["y", "x"]  # before/after hooks nest


def test_constraints_win_over_after_event_reversal():
    plan = build_plan({"x": decl({AL: Access()}, runs_before={"y"}), "y": decl({AL: Access()})})
    assert plan.order[AL] == ["x", "y"]


def test_write_write_conflict_names_both_algorithms_and_the_field():
    plan = build_plan(
        {
            "mixer": decl({B: writes("batch.targets")}),
            "smoother": decl({B: writes("batch.targets", "loss")}),
        }
    )
    assert len(plan.conflicts) == 1
    conflict = plan.conflicts[0]
    assert conflict.kind == "write-write"
    assert conflict.algorithms == ("mixer", "smoother")
    assert conflict.field == "batch.targets" and conflict.event == B
    assert "mixer" in str(conflict) and "smoother" in str(conflict)
    assert "batch.targets" in str(conflict) and "BEFORE_LOSS" in str(conflict)


def test_whole_batch_write_overlaps_every_batch_key():
    plan = build_plan({"a": decl({B: writes("batch")}), "b": decl({B: writes("batch.inputs")})})
    assert [c.field for c in plan.conflicts] == ["batch.inputs"]


def test_transitive_order_resolves_a_write_write_conflict():
    plan = build_plan(
        {
            "a": decl({B: writes("loss")}, runs_before={"m"}),
            "m": decl({}, runs_before={"c"}),
            "c": decl({B: writes("loss")}),
        }
    )
    assert plan.conflicts == []
    assert plan.order[B] == ["a", "c"]


def test_writes_at_different_events_do_not_conflict():
    plan = build_plan({"a": decl({B: writes("loss")}), "b": decl({AL: writes("loss")})})
    assert plan.conflicts == []


def test_declared_incompatibility_reported_once():
    plan = build_plan({"a": decl(incompatible_with={"b"}), "b": decl(incompatible_with={"a"})})
    assert [(c.kind, c.algorithms) for c in plan.conflicts] == [("incompatible", ("a", "b"))]


def test_not_applicable_to_model_or_data_kind():
    plan = build_plan(
        {"vision_only": decl(model_kinds={"cnn"}), "text_only": decl(data_kinds={"text"})},
        model_kind="mlp",
        data_kind="image",
    )
    kinds = sorted((c.kind, c.algorithms) for c in plan.conflicts)
    assert kinds == [("not-applicable", ("text_only",)), ("not-applicable", ("vision_only",))]
    assert "mlp" in str(plan.conflicts[0]) or "mlp" in str(plan.conflicts[1])


def test_cycle_is_a_conflict():
    plan = build_plan(
        {"a": decl({B: Access()}, runs_before={"b"}), "b": decl({B: Access()}, runs_before={"a"})}
    )
    assert [c.kind for c in plan.conflicts] == ["cycle"]


def test_unknown_order_name_is_a_warning_when_names_are_known():
    plan = build_plan({"a": decl(runs_after={"nonexistent"})}, known_names={"a"})
    assert plan.conflicts == []
    assert plan.warnings == [
        "a declares an order relative to 'nonexistent', which is not a registered algorithm"
    ]
    assert "warning: a declares" in plan.format()


def test_check_composition_problems_become_conflicts():
    class Picky(Algorithm):
        name = "picky"

        def declare(self):
            return Declaration()

        def check_composition(self, algorithms):
            return [f"needs a partner, got {sorted(algorithms)}"]

    plan = build_plan({"picky": decl()}, algorithms=[Picky()])
    assert [(c.kind, str(c)) for c in plan.conflicts] == [
        ("invalid", "picky: needs a partner, got ['picky']")
    ]


def test_unknown_state_field_is_rejected_at_declaration():
    with pytest.raises(ValueError, match="unknown state field 'batch_targets'"):
        Access(writes=["batch_targets"])


@dataclass(eq=False, repr=False)  # compared and printed as an Algorithm, by identity and name
class Recorder(Algorithm):
    """Appends ``(event, name)`` to ``log`` at each of ``events``; with ``only_odd``, matches
    only every other time it is asked."""

    name: str = field()  # required: not Algorithm's class-level default
    events: list
    log: list
    runs_before: Collection[str] = ()
    only_odd: bool = False
    asked: int = field(default=0, init=False)

    def declare(self):
        return Declaration({e: Access() for e in self.events}, runs_before=self.runs_before)

    def match(self, event, state):
        self.asked += 1
        return not self.only_odd or self.asked % 2 == 1

    def apply(self, event, state, logger):
        self.log.append((event, self.name))


def test_engine_dispatches_only_declared_events_in_plan_order():
    log = []
    a = Recorder("a", [Event.BATCH_END], log)
    b = Recorder("b", [Event.BATCH_END, Event.FIT_START], log, runs_before={"a"})
    engine = Engine(state=None, logger=Logger(), algorithms=[a, b], trace=True)
    engine.compile()
    for event in Event:
        engine.run(event)
    assert log == [(Event.FIT_START, "b"), (Event.BATCH_END, "b"), (Event.BATCH_END, "a")]
    assert a.asked == 1  # never asked about events it did not declare
    assert engine.trace == [("fit_start", "b"), ("batch_end", "b"), ("batch_end", "a")]


def test_match_false_skips_apply():
    log = []
    a = Recorder("a", [Event.BATCH_END], log, only_odd=True)
    engine = Engine(state=None, logger=Logger(), algorithms=[a])
    engine.compile()
    for _ in range(4):
        engine.run(Event.BATCH_END)
    assert len(log) == 2


def test_engine_compile_raises_on_conflict_and_lists_it():
    class W(Algorithm):
        def __init__(self, name):
            self.name = name

        def declare(self):
            return Declaration({B: writes("loss")})

    engine = Engine(state=None, logger=Logger(), algorithms=[W("p"), W("q")])
    with pytest.raises(PlanError, match="p and q both write loss at BEFORE_LOSS"):
        engine.compile()
    with pytest.raises(PlanError, match="listed twice"):
        Engine(state=None, logger=Logger(), algorithms=[W("p"), W("p")]).compile()


def test_a_recipe_s_algorithms_are_built_once_and_passed_on(tmp_path) -> None:
    """`speedup run` builds the recipe's algorithms once: the objects it plans are the ones
    that train (the registry's builder is the one place they are made)."""
    from omegaconf import OmegaConf

    from speedup.algorithm import build_algorithms
    from speedup.config import load_config
    from speedup.run import build_trainer, plan_config

    cfg = load_config(
        "quickstart", ["algorithms={label_smoothing: {alpha: 0.2}, ema: {}}", f"run_dir={tmp_path}"]
    )
    algorithms = build_algorithms(OmegaConf.to_container(cfg.algorithms))
    assert [a.name for a in algorithms] == ["label_smoothing", "ema"]
    assert algorithms[0].alpha == 0.2
    plan, _ = plan_config(cfg, algorithms)
    assert not plan.conflicts
    trainer = build_trainer(cfg, algorithms=algorithms)
    assert all(any(a is b for b in trainer.state.algorithms) for a in algorithms)
