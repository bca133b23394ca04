"""One source of truth per config key: the schema's field metadata, the generated reference,
the default optimizer, and the one check of an optimizer's argument names and types."""

from dataclasses import fields

import pytest
import torch
from omegaconf import OmegaConf

from speedup.config import REFERENCE, ConfigError, RunConfig, load_config, reference_table
from speedup.optim import (
    DEFAULT_OPTIMIZER,
    DEFAULT_SCHEDULER,
    build_optimizer,
    optimizer_argument_problem,
    optimizer_class,
)


def test_every_key_is_described_once_beside_its_field():
    for f in fields(RunConfig):
        assert f.metadata["kind"] and f.metadata["help"], f.name
    described = {f.name: (f.metadata["kind"], f.metadata["help"]) for f in fields(RunConfig)}
    # REFERENCE is computed: extends (read by the loader, never a field), then the fields.
    assert list(REFERENCE) == ["extends", *described]
    assert {k: v for k, v in REFERENCE.items() if k != "extends"} == described


def test_reference_table_rows_come_from_the_metadata_and_the_defaults():
    rows = {line.split(" | ")[0].strip("| `"): line for line in reference_table().splitlines()[2:]}
    assert list(rows) == list(REFERENCE)
    # Sections a recipe must fill show no default; the others show the schema's.
    assert rows["model"].split(" | ")[2] == "-" and rows["extends"].split(" | ")[2] == "-"
    assert rows["optimizer"].split(" | ")[2] == "`{name: sgd, lr: 0.1}`"
    assert rows["seed"] == ("| `seed` | int | 17 | seeds python, numpy, torch and the data order |")


def test_the_default_optimizer_and_schedule_are_written_once():
    schema = OmegaConf.structured(RunConfig)
    assert OmegaConf.to_container(schema.optimizer) == DEFAULT_OPTIMIZER
    assert OmegaConf.to_container(schema.scheduler) == DEFAULT_SCHEDULER
    schema.optimizer.lr = 0.5  # each config gets its own copy
    assert DEFAULT_OPTIMIZER["lr"] == 0.1
    optimizer = build_optimizer([torch.zeros(2, requires_grad=True)])
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["lr"] == DEFAULT_OPTIMIZER["lr"]


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("sgd", {"lr": 0.1, "momentum": 0.9}, None),
        ("sgd", {"lr": 1}, None),  # an int is a float
        ("sgd", {"momentun": 0.9}, ("momentun", "not an argument of SGD (did you mean")),
        ("sgd", {"lr": "x"}, ("lr", "wrong type: got 'x', expected float")),
        ("sgd", {"lr": True}, ("lr", "wrong type: got True, expected float")),
        ("adamw", {"betas": "x"}, ("betas", "wrong type: got 'x', expected tuple")),
        ("adamw", {"amsgrad": 1.0}, ("amsgrad", "wrong type: got 1.0, expected bool")),
        ("lookahead", {}, (None, "missing required key(s) optimizer")),
    ],
)
def test_optimizer_argument_problem_checks_names_then_types(name, args, expected):
    problem = optimizer_argument_problem(optimizer_class(name), args)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and problem[0] == expected[0]
        assert problem[1].startswith(expected[1]), problem[1]


def test_names_are_checked_before_types():
    problem = optimizer_argument_problem(optimizer_class("sgd"), {"lr": "x", "momentun": 0.9})
    assert problem is not None and problem[0] == "momentun"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "sgd", "lr": "x"}, "optimizer.lr: wrong type: got 'x'"),
        ({"name": "sgd", "lr": True}, "optimizer.lr: wrong type: got True"),
        ({"name": "sgd", "momentun": 0.9}, "optimizer.momentun: not an argument of SGD"),
    ],
)
def test_build_optimizer_refuses_wrong_names_and_types_naming_the_key(spec, message):
    # Before, lr=True trained silently with lr 1 and lr='x' failed inside torch's comparison.
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        build_optimizer([torch.zeros(2, requires_grad=True)], spec)


def test_recipe_optimizer_type_error_names_the_layer_that_set_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("extends: quickstart\noptimizer:\n  lr: true\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(recipe), ["optimizer.weight_decay=0.1"])
    # The file set lr; the command line only touched weight_decay.
    assert str(err.value).startswith(f"{recipe}: optimizer.lr: wrong type: got True")
    with pytest.raises(ConfigError, match=r"^the command line: optimizer\.lr: wrong type"):
        load_config("quickstart", ["optimizer.lr=abc"])


def test_validation_reports_the_first_section_checked():
    # durations before the top-level ranges, those before the optimizer, and so on.
    with pytest.raises(ConfigError, match=r"max_duration: must be > 0"):
        load_config("quickstart", ["max_duration=0ba", "precision=fp64", "optimizer.lr=x"])
    with pytest.raises(ConfigError, match=r"precision: 'fp64' is not allowed"):
        load_config("quickstart", ["precision=fp64", "optimizer.lr=x"])
    with pytest.raises(ConfigError, match=r"optimizer\.lr: wrong type"):
        load_config("quickstart", ["optimizer.lr=x", "algorithms.no_such_thing={}"])
