"""Search-space declarations: validated, declared by the built-ins, sampled into configs."""

from __future__ import annotations

import optuna
import pytest
from speedup.tuning.space import Infeasible, Space, applicable_algorithms, suggest

from speedup.algorithm import ALGORITHMS, Algorithm, check_search_space
from speedup.config import ConfigError, load_config


class Toy(Algorithm):
    name = "toy"

    def __init__(self, alpha: float = 0.1, start: str = "0.5dur", depth: int = 2) -> None:
        self.alpha, self.start, self.depth = alpha, start, depth


@pytest.mark.parametrize(
    "space, message",
    [
        ({"beta": {"type": "float", "low": 0, "high": 1}}, "has no argument 'beta'"),
        ({"alpha": {"type": "float", "low": 0.5, "high": 0.5}}, "low < high"),
        ({"alpha": {"type": "float", "low": 0.9, "high": 0.1}}, "low < high"),
        ({"alpha": {"type": "float", "low": 0.0, "high": 1, "log": True}}, "low > 0"),
        ({"alpha": {"type": "float", "low": "a", "high": 1}}, "low < high"),
        ({"alpha": {"type": "uniform", "low": 0, "high": 1}}, "type must be one of"),
        ({"alpha": {"type": "categorical", "choices": []}}, "non-empty list"),
        ({"alpha": {"type": "float", "low": 0, "high": 1, "step": 2}}, "unknown key 'step'"),
        ({"depth": {"type": "int", "low": 1.5, "high": 3}}, "whole-number"),
        ({"start": {"type": "float", "low": 0.1, "high": 0.9, "unit": "days"}}, "unit must be"),
    ],
)
def test_bad_declarations_name_the_argument_and_the_rule(space: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        check_search_space(Toy, space)
    assert "toy.SEARCH_SPACE" in str(info.value)


def test_good_declaration_is_normalised() -> None:
    space = check_search_space(
        Toy,
        {
            "alpha": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
            "depth": {"type": "categorical", "choices": (1, 2)},
        },
    )
    assert space == {
        "alpha": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
        "depth": {"type": "categorical", "choices": [1, 2]},
    }


def test_every_builtin_declaration_is_valid_and_the_useful_ones_exist() -> None:
    declared = {}
    for name in ALGORITHMS.names():
        space = ALGORITHMS.get(name).search_space()  # raises on a bad declaration
        if space is not None:
            declared[name] = space
    for name in (
        "label_smoothing",
        "progressive_resizing",
        "ema",
        "mixup",
        "cutmix",
        "layer_freezing",
        "selective_backprop",
        "sam",
        "stochastic_depth",
        "blurpool",
        "channels_last",
        "seq_length_warmup",
    ):
        assert name in declared, name
    assert declared["channels_last"] == {}
    assert declared["ema"]["half_life"]["unit"] == "dur"


def test_applicable_algorithms_follow_the_workload_kinds() -> None:
    quick = applicable_algorithms(load_config("quickstart"))  # 1-D signals, a CNN
    assert "label_smoothing" in quick
    assert "mixup" not in quick and "progressive_resizing" not in quick  # image-only
    vision = applicable_algorithms(load_config("shapes2d-baseline"))
    assert {"mixup", "cutmix", "progressive_resizing"} <= set(vision)
    with pytest.raises(ConfigError, match="--algorithms: mixup cannot run"):
        applicable_algorithms(load_config("quickstart"), ["mixup"])


def suggest_on_shapes2d(algorithms: list[str], params: dict) -> tuple[Space, dict]:
    """The search space of the shapes2d baseline over ``algorithms``, and the config changes
    one trial with the fixed ``params`` suggests in it."""
    cfg = load_config("shapes2d-baseline")
    space = Space.for_workload(cfg, algorithms)
    return space, suggest(optuna.trial.FixedTrial(params), space, cfg)


def test_suggest_turns_params_into_config_changes() -> None:
    params = {
        "lr": 0.05,
        "budget": 0.5,
        "use.label_smoothing": True,
        "label_smoothing.alpha": 0.1,
        "use.progressive_resizing": True,
        "progressive_resizing.initial_scale": 0.5,
        "progressive_resizing.delay": 0.45,
        "progressive_resizing.finetune": 0.2,
    }
    space, changes = suggest_on_shapes2d(["label_smoothing", "progressive_resizing"], params)
    assert changes["optimizer.lr"] == 0.05
    assert changes["scale_schedule_ratio"] == 0.5
    assert changes["algorithms"]["label_smoothing"] == {"alpha": 0.1}
    assert changes["algorithms"]["progressive_resizing"]["delay"] == "0.45dur"
    lr = float(load_config("shapes2d-baseline").optimizer.lr)
    assert space.lr == pytest.approx((lr / 10, lr * 10))
    assert space.baseline().algorithms == {} and space.baseline().lr == space.lr


def test_conflicting_compositions_are_never_run() -> None:
    params = {
        "lr": 0.05,
        "budget": 1.0,
        "use.mixup": True,
        "mixup.alpha": 0.2,
        "use.cutmix": True,
        "cutmix.alpha": 1.0,
    }
    with pytest.raises(Infeasible, match="mixup|cutmix"):
        suggest_on_shapes2d(["mixup", "cutmix"], params)


def test_an_algorithm_that_replaces_the_schedule_gets_a_constant_one() -> None:
    """schedule_free refuses any LR schedule; switched on by the tuner, the trial's recipe
    gets the section it declares (REQUIRES_CONFIG) instead of a run that fails at load."""
    cfg = load_config("stdlib-gpt", ["scheduler.name=cosine", "scheduler.warmup=0.1dur"])
    space = Space.for_workload(cfg, ["schedule_free", "rotary"])
    params = {"lr": 0.01, "budget": 1.0, "use.rotary": True, "rotary.fraction": 1.0}
    off = suggest(optuna.trial.FixedTrial({**params, "use.schedule_free": False}), space, cfg)
    assert "scheduler" not in off
    on = {"use.schedule_free": True, "schedule_free.beta": 0.9, "schedule_free.warmup": 0.05}
    changes = suggest(optuna.trial.FixedTrial({**params, **on}), space, cfg)
    assert changes["scheduler"] == {"name": "constant"}
    assert changes["algorithms"]["schedule_free"]["warmup"] == "0.05dur"
