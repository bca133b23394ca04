"""The whole algorithm catalogue: registered, documented, planned together, and trainable."""

from __future__ import annotations

import inspect
import sys
import warnings
from typing import TYPE_CHECKING

import pytest
import torch

from speedup.algorithm import ALGORITHMS
from speedup.callback import Callback
from speedup.cli import main
from speedup.config import load_config
from speedup.engine import build_plan
from speedup.event import Event
from speedup.run import build_trainer

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

#: Composer's algorithm catalogue (DESIGN.md), plus this project's pruning and rewinding.
CATALOGUE = {
    "alibi", "augmix", "blurpool", "channels_last", "colout", "cutmix", "cutout", "ema",
    "factorize", "gated_linear_units", "ghost_batchnorm", "gradient_clipping", "gyro_dropout",
    "label_smoothing", "layer_freezing", "low_precision_groupnorm", "low_precision_layernorm",
    "magnitude_pruning", "mixup", "no_op_model", "progressive_resizing", "randaugment",
    "rewinding", "sam", "selective_backprop", "seq_length_warmup", "squeeze_excite",
    "stochastic_depth", "swa", "weight_standardization",
    # The speedrun records' vision speedups (issue 18).
    "alternating_flip", "test_time_augmentation", "whitening_init",
    # The speedrun records' language and batch speedups (issue 18).
    "batch_size_warmup", "qk_norm", "relu_squared", "rotary",
    # The speedrun records' optimizers (issue 18).
    "muon", "schedule_free", "lookahead",
}  # fmt: skip

#: The pairs declared incompatible: the only conflicts when everything is planned together.
INCOMPATIBLE = {
    frozenset({"mixup", "cutmix"}),  # two target-interpolating algorithms
    frozenset({"ema", "swa"}),  # two weight averages
    frozenset({"no_op_model", "magnitude_pruning"}),
    frozenset({"weight_standardization", "magnitude_pruning"}),
    frozenset({"whitening_init", "weight_standardization"}),  # it would re-standardise the filters
    frozenset({"lookahead", "ema"}),  # two weight averages swapped in at evaluation
    # Schedule-free replaces the optimizer and the LR schedule and averages the weights itself.
    frozenset({"schedule_free", "muon"}),
    frozenset({"schedule_free", "lookahead"}),
    frozenset({"schedule_free", "ema"}),
    frozenset({"schedule_free", "swa"}),
    frozenset({"schedule_free", "rewinding"}),
    frozenset({"schedule_free", "magnitude_pruning"}),
    frozenset({"rotary", "alibi"}),  # two relative position schemes
}


def test_every_algorithm_is_registered() -> None:
    # Other test modules register throwaway algorithms named test_*; the rest is the catalogue
    # (test_time_augmentation is a built-in whose name happens to start so).
    names = {n for n in ALGORITHMS.names() if not n.startswith("test_") or n in CATALOGUE}
    assert names == CATALOGUE


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_every_algorithm_has_a_method_card_and_describes(name: str, capsys) -> None:
    cls = ALGORITHMS.get(name)
    card = inspect.cleandoc(sys.modules[cls.__module__].__doc__ or "")
    for section in ("**What.**", "**When it helps.**", "**Composes badly with.**"):
        assert section in card, f"{name}: method card lacks {section}"
    assert "Functional twin" in card
    assert cls.name == name and cls.__doc__ and cls.__doc__.strip()
    assert main(["describe", name]) == 0
    out = capsys.readouterr().out
    assert card.splitlines()[0] in out and "arguments:" in out


def test_list_shows_every_algorithm_with_its_summary(capsys) -> None:
    assert main(["list", "algorithms"]) == 0
    out = capsys.readouterr().out
    for name in CATALOGUE:
        summary = inspect.cleandoc(ALGORITHMS.get(name).__doc__).splitlines()[0]
        assert any(line.split()[:1] == [name] and summary in line for line in out.splitlines())


def test_the_whole_catalogue_plans_with_only_declared_incompatibilities() -> None:
    declarations = {name: ALGORITHMS.get(name)().declare() for name in CATALOGUE}
    plan = build_plan(declarations, None, None, known_names=CATALOGUE)
    messages = [str(c) for c in plan.conflicts]
    assert all(m.endswith(" are declared incompatible") for m in messages), messages
    pairs = {
        frozenset(m.removesuffix(" are declared incompatible").split(" and ")) for m in messages
    }
    assert pairs == INCOMPATIBLE
    surgery = plan.order[Event.INIT]
    assert surgery[-2:] == ["channels_last", "no_op_model"]  # layout, then replacement, last
    order = plan.order[Event.AFTER_DATALOADER]
    assert order.index("selective_backprop") < order.index("mixup")  # sees the clean batch
    before_loss = plan.order[Event.BEFORE_LOSS]
    assert before_loss.index("mixup") < before_loss.index("label_smoothing")  # soft targets


def test_plan_rejects_a_planted_conflicting_pair(capsys) -> None:
    assert main(["plan", "shapes2d-medium"]) == 0
    capsys.readouterr()
    assert main(["plan", "shapes2d-medium", "algorithms.cutmix.alpha=1.0"]) == 2  # as `run`
    captured = capsys.readouterr()
    assert "mixup and cutmix are declared incompatible" in captured.out + captured.err
    assert main(["run", "shapes2d-medium", "--smoke", "algorithms.cutmix={}"]) == 2
    assert "declared incompatible" in capsys.readouterr().err


#: (recipe, overrides) a tiny workload each algorithm applies to.
IMAGE = ("shapes2d-baseline", ["model.width=4", "data.resolution=32"])
SIGNAL = ("quickstart", [])
GPT = ("stdlib-gpt", [])
BERT = ("stdlib-bert", [])
WORKLOAD = {
    "alibi": GPT, "gated_linear_units": BERT, "seq_length_warmup": GPT,
    "qk_norm": GPT, "relu_squared": GPT, "rotary": GPT, "batch_size_warmup": GPT,
}  # fmt: skip
EXTRA = {
    "rewinding": {"algorithms.magnitude_pruning.at": "10ba"},
    "low_precision_groupnorm": {"precision": "bf16", "model.norm": "group"},
    "low_precision_layernorm": {"precision": "bf16"},
    "gyro_dropout": {"model.dropout": 0.1, "algorithms.gyro_dropout.sigma": 4,
                     "algorithms.gyro_dropout.tau": 2},
    "swa": {"algorithms.swa.swa_start": "0.5dur", "algorithms.swa.update_interval": "2ba"},
    "selective_backprop": {"algorithms.selective_backprop.start": "0dur"},
    "layer_freezing": {"algorithms.layer_freezing.freeze_start": "0dur"},
    "schedule_free": {"scheduler.name": "constant"},  # it replaces the LR schedule
}  # fmt: skip


def _workload(name: str):
    if name in WORKLOAD:
        return WORKLOAD[name]
    kinds = ALGORITHMS.get(name)().declare()
    if kinds.model_kinds or kinds.data_kinds or name == "rewinding":
        return IMAGE
    return SIGNAL


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_every_algorithm_trains_twenty_steps_from_a_recipe(name: str, tmp_path) -> None:
    recipe, overrides = _workload(name)
    extra = {f"algorithms.{name}": "{}"}
    if name == "rewinding":
        extra = {"algorithms.magnitude_pruning.sparsity": 0.5, "algorithms.rewinding.to": "5ba"}
    extra.update(EXTRA.get(name, {}))
    if name == "gyro_dropout":
        recipe, overrides = GPT  # a model with dropout to replace
    changes = [f"{k}={v}" for k, v in extra.items()]
    cfg = load_config(
        recipe,
        [*overrides, *changes, "max_duration=20ba", f"run_dir={tmp_path}", "progress_bar=false"],
        smoke=True,
    )
    losses = []

    class Record(Callback):
        def after_train_batch(self, state: State, logger: Logger) -> None:
            losses.append(float(state.train_metrics["loss"]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "no effect at fp32" notes are not the point here
        trainer = build_trainer(cfg, extra_callbacks=[Record()])
        assert name in {a.name for a in trainer.state.algorithms}
        metrics = trainer.fit()
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.state.timestamp.batch == 20 and metrics
