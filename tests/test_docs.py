"""The code in the docs runs as written."""

import re
from pathlib import Path

import pytest
import torch
from conftest import loaders, make_blobs, tiny_model

from speedup.callback import Callback
from speedup.engine import build_plan
from speedup.event import Event
from speedup.trainer import Trainer

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_writing_an_algorithm_tutorial_code_trains():
    namespace: dict = {}
    exec(python_blocks("writing-an-algorithm.md")[0], namespace)
    algorithm = namespace["MySmoothing"](alpha=0.2)
    smoothed = namespace["smooth_labels"](torch.tensor([0, 2]), 4, 0.2)
    torch.testing.assert_close(smoothed[0], torch.tensor([0.85, 0.05, 0.05, 0.05]))

    class TargetTap(Callback):
        seen = None

        def after_loss(self, state, logger):
            self.seen = state.batch["targets"]

    tap = TargetTap()
    train, evaluation = loaders(make_blobs(n=64), batch_size=16)
    Trainer(
        tiny_model(),
        train,
        "2ba",
        eval_dataloader=evaluation,
        algorithms=[algorithm],
        callbacks=[tap],
        data_kind="signal",
    ).fit()
    assert tap.seen.dtype.is_floating_point and tap.seen.shape == (16, 4)
    assert torch.allclose(tap.seen.max(-1).values, torch.tensor(0.85))
    plan = build_plan({"my_smoothing": algorithm.declare()}, data_kind="text")
    assert [c.kind for c in plan.conflicts] == ["not-applicable"]
    assert Event.BEFORE_LOSS in algorithm.declare().events


@pytest.mark.slow
def test_quickstart_python_api_example():
    code = python_blocks("quickstart.md")[0].replace('"10ep"', '"2ep"')
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["trainer"].state.eval_metrics["accuracy"] > 0.3


def test_recipes_reference_is_generated_from_the_schema():
    from dataclasses import fields

    from speedup.config import REFERENCE, RunConfig, reference_table

    assert set(REFERENCE) == {f.name for f in fields(RunConfig)} | {"extends"}
    text = (DOCS / "recipes.md").read_text()
    assert reference_table() in text, "regenerate: python -m speedup.config"


def test_writing_an_algorithm_conformance_example_runs():
    namespace: dict = {}
    blocks = python_blocks("writing-an-algorithm.md")
    exec(blocks[0], namespace)
    exec(blocks[1], namespace)
    report = namespace["report"]
    assert report.algorithm == "my_smoothing" and report.steps == 8
    assert report.applied and all(count > 0 for count in report.applied.values())
