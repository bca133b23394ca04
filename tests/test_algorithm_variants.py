"""The variant measurement script, in its tiny mode (a few steps per run)."""

import json
import math

import pytest
import yaml
from speedup.benchmarks.algorithm_variants import VARIANTS, main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_measurement_reports_steps_to_target_and_reuses_finished_runs(tmp_path, capsys):
    args = ["--tiny", "--seeds", "3", "--out", str(tmp_path)]
    args += ["--variants", "baseline", "resizing-bilinear_antialias"]
    # Every evaluation reaches accuracy 0, so the target is met at the first one: step 2.
    results = main([*args, "--target", "0"])
    assert results == {"baseline_steps": 2.0, "resizing_bilinear_antialias_steps": 2.0}
    printed = capsys.readouterr().out
    assert "steps to eval accuracy 0.0 on shapes2d, seeds [3]" in printed
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert [r.rsplit("-", 1)[0] for r in runs] == [
        "baseline-seed3",
        "resizing-bilinear_antialias-seed3",
    ]
    # each run trained its own variant
    for run in runs:
        config = yaml.safe_load((tmp_path / run / "config.yaml").read_text())
        if run.startswith("resizing"):
            assert config["algorithms"]["progressive_resizing"]["interpolation"] == (
                "bilinear_antialias"
            )
        else:
            assert config["algorithms"] == {}
        finals = json.loads((tmp_path / run / "summary.json").read_text())["metrics"]
        assert 0.0 <= finals["accuracy"] <= 1.0
    stamps = {r: (tmp_path / r / "summary.json").stat().st_mtime_ns for r in runs}

    # A target no evaluation reaches is infinite steps; the finished runs are reused.
    results = main([*args, "--target", "1.01"])
    assert results == {"baseline_steps": math.inf, "resizing_bilinear_antialias_steps": math.inf}
    assert {r: (tmp_path / r / "summary.json").stat().st_mtime_ns for r in runs} == stamps
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("base"))
    assert row.split()[:3] == ["baseline", "inf", "inf"]


def test_every_variant_sets_what_it_compares():
    assert VARIANTS["resizing-nearest"][1] == [
        "algorithms.progressive_resizing.interpolation=nearest"
    ]
    assert VARIANTS["selective-probabilistic"][1][0].endswith("selection=probabilistic")
    assert VARIANTS["selective-topk"][1][0].endswith("selection=topk")
    with pytest.raises(SystemExit):
        main(["--variants", "mystery"])
