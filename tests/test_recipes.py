"""Every shipped recipe validates, plans without conflict and smoke-trains on the CPU."""

import json
import math

import pytest

from speedup.config import load_config, recipe_names
from speedup.run import plan_config, run_config


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_validates_plans_and_smoke_trains(name, tmp_path):
    cfg = load_config(name)
    plan, _ = plan_config(cfg)
    assert plan.conflicts == []
    smoke = load_config(name, [f"run_dir={tmp_path}", "progress_bar=false"], smoke=True)
    summary = run_config(smoke)
    assert summary["steps"] == 4
    assert summary["metrics"], "the final state is evaluated"
    assert all(math.isfinite(v) for v in summary["metrics"].values())
    assert json.loads((tmp_path / "summary.json").read_text())["recipe"] == name
    # The log is complete: it is the live file (not one deleted under an open handle), and its
    # last eval record is the final evaluation at the last step.
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert evals and evals[-1]["step"] == 4
    final = {k.removeprefix("eval/"): v for k, v in evals[-1].items() if k.startswith("eval/")}
    assert final == pytest.approx(summary["metrics"])


def test_every_recipe_states_what_it_is():
    from speedup.config import resolve_recipe

    for name in recipe_names():
        first = resolve_recipe(name).read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, f"{name}: header comment missing"
