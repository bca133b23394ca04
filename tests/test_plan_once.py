"""A recipe's algorithms are built once and planned once: validation builds them, ``speedup
plan``/``speedup run`` plan those objects, and the engine trains them with that same plan
(issue 17, "each thing built once"). The engine plans again only for what the plan was not
made for: other algorithms, or a model or data of another kind."""

import json

import pytest
import torch

import speedup.engine
from algorithms.label_smoothing import LabelSmoothing
from speedup.algorithm import ALGORITHMS
from speedup.cli import main
from speedup.config import ConfigError, load_config, load_recipe
from speedup.engine import build_plan
from speedup.event import Event
from speedup.run import build_trainer, plan_config
from speedup.trainer import Trainer

SHORT = [
    "max_duration=2ba",
    "eval_interval=0ba",
    "data.train_samples=64",
    "data.batch_size=16",
    "threads=1",
]


class CountedLabelSmoothing(LabelSmoothing):
    """Label smoothing that counts how many times a recipe's entry is built."""

    name = "counted_label_smoothing"
    built = 0

    def __init__(self, alpha: float = 0.1, binary: bool = False) -> None:
        super().__init__(alpha=alpha, binary=binary)
        type(self).built += 1


@pytest.fixture
def counted(monkeypatch):
    monkeypatch.setitem(ALGORITHMS._items, CountedLabelSmoothing.name, CountedLabelSmoothing)
    monkeypatch.setattr(CountedLabelSmoothing, "built", 0)
    return CountedLabelSmoothing


@pytest.fixture
def plans_made(monkeypatch):
    """Every plan :func:`speedup.engine.build_plan` makes, in order (the real function runs)."""
    made = []

    def recording(*args, **kwargs):
        made.append(build_plan(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(speedup.engine, "build_plan", recording)
    return made


def test_load_recipe_returns_the_algorithms_validation_built(counted):
    cfg, algorithms = load_recipe(
        "quickstart", ["algorithms.counted_label_smoothing.alpha=0.2", "algorithms.ema={}"]
    )
    assert [a.name for a in algorithms] == ["counted_label_smoothing", "ema"]
    assert algorithms[0].alpha == 0.2
    assert counted.built == 1
    assert (
        load_config("quickstart", ["algorithms.ema={}"])
        == load_recipe("quickstart", ["algorithms.ema={}"]).config
    )


def test_a_refused_value_is_still_a_config_error_naming_the_key(counted):
    with pytest.raises(ConfigError, match=r"algorithms\.counted_label_smoothing.*alpha"):
        load_recipe("quickstart", ["algorithms.counted_label_smoothing.alpha=1.5"])


def test_the_trainer_runs_the_planned_objects_with_that_plan(counted, plans_made):
    cfg, algorithms = load_recipe("quickstart", [*SHORT, "algorithms.counted_label_smoothing={}"])
    plan, _ = plan_config(cfg, algorithms)
    trainer = build_trainer(cfg, algorithms=algorithms, plan=plan)
    assert trainer.engine.plan is plan
    assert trainer.state.algorithms[0] is algorithms[0]
    assert plans_made == [plan]  # the engine did not plan again
    assert counted.built == 1


def test_an_added_algorithm_is_planned_by_the_engine(counted, plans_made):
    cfg, algorithms = load_recipe("quickstart", [*SHORT, "algorithms.counted_label_smoothing={}"])
    plan, _ = plan_config(cfg, algorithms)
    trainer = build_trainer(
        cfg,
        algorithms=algorithms,
        plan=plan,
        extra_algorithms=[ALGORITHMS.get("ema")(half_life="1ba")],
    )
    assert trainer.engine.plan is not plan
    assert len(plans_made) == 2
    assert "ema" in trainer.engine.plan.order[Event.FIT_START]


def test_a_plan_for_another_model_kind_is_not_reused(plans_made):
    """A plan made for a registered model's kind, handed to a trainer of a plain module."""
    smoothing = LabelSmoothing()
    stale = build_plan({"label_smoothing": smoothing.declare()}, model_kind="cnn")
    model = torch.nn.Linear(4, 3)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    trainer = Trainer(model, data, "1ba", algorithms=[smoothing], plan=stale, device="cpu")
    assert trainer.engine.plan is not stale
    assert trainer.engine.plan.model_kind == trainer.state.model.kind != "cnn"
    assert trainer.engine.plan.order == stale.order


def test_speedup_run_builds_and_plans_each_algorithm_once(counted, plans_made, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*SHORT, "algorithms.counted_label_smoothing={}", f"run_dir={run_dir}"]
    assert main(["run", "quickstart", *overrides]) == 0
    assert counted.built == 1
    assert len(plans_made) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
