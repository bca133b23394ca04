"""``speedup tune``: bad input exits 2 before training; the smoke run writes its outputs and
resumes without training again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from speedup.cli import main
from speedup.config import load_config


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trials", "0"], "--trials: must be >= 1"),
        (["--seeds", "0", "1", "--validate-seeds", "1", "5"], "also searched"),
        (["--validate-seeds", "100", "101"], "at least 5"),
        (["--algorithms", "mixup"], "mixup cannot run on this workload"),
        (["--algorithms", "no_such_thing"], "no_such_thing"),
        (["--target", "accuracy=high"], "--target: 'high' is not a number"),
        (["--min-budget", "0"], "--min-budget: must be in (0, 1]"),
    ],
)
def test_bad_input_exits_2_before_training(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "tune"
    assert main(["tune", "quickstart", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "runs").exists()


@pytest.mark.slow
def test_smoke_tune_writes_recipe_and_report_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "tune"
    command = ["tune", "quickstart", "--smoke", "--trials", "2", "--out", str(out)]
    assert main(command) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["trial_counts"] == {"baseline-speed": 2, "methods": 2}
    finals = [r["final"] for r in results["target"]["tuned_baseline"]["finals"]]
    assert results["target"]["value"] == pytest.approx((finals[0] + finals[1]) / 2)  # 2 seeds
    assert [r["seed"] for r in results["baseline"]["runs"]] == [100, 101]
    report = (out / "report.md").read_text()
    assert "Validated on fresh seeds" in report and (out / "pareto.png").stat().st_size > 0
    recipe = (out / "recipe.yaml").read_text()
    assert "# git revision:" in recipe and "# target: accuracy" in recipe
    winner = load_config(str(out / "recipe.yaml"))  # a recipe `speedup run` accepts
    changes = results["winner"]["changes"]
    assert winner.optimizer.lr == pytest.approx(changes["optimizer.lr"])
    assert winner.scale_schedule_ratio == pytest.approx(changes["scale_schedule_ratio"])
    assert yaml.safe_load(recipe)["algorithms"] == (changes.get("algorithms") or {})
    runs = sorted(p.name for p in (out / "runs").iterdir())
    capsys.readouterr()
    # The same command again: every study is complete, every run reused.
    assert main(command) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs
    again = json.loads((out / "results.json").read_text())
    assert again["target"] == results["target"]
    assert again["trial_counts"] == results["trial_counts"]
