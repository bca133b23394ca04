"""The sweep report: report.md tables, analysis.json, three PNGs, a byte-exact rebuild."""

import json
import math

import pytest
from _helpers import sweep_results
from speedup.benchmarks.report import rebuild, write_report

from speedup.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def results_payload():
    """baseline, two singles, their pair and a config that never reaches the target; 2 seeds
    on 100-step curves (0.25 s of wall-clock a step), the second seed's runs from the cache."""
    results = sweep_results(
        {
            "baseline": [60, 80],
            "label_smoothing": [50, 70],
            "progressive_resizing": [60, 80],
            "label_smoothing+progressive_resizing": [40, 60],
            "pruning": [None, None],
        },
        {
            "baseline": 0.91,
            "label_smoothing": 0.93,
            "progressive_resizing": 0.9,
            "label_smoothing+progressive_resizing": 0.92,
            "pruning": 0.38,
        },
        {
            "baseline": 1.0,
            "label_smoothing": 1.0,
            "progressive_resizing": 0.5,
            "label_smoothing+progressive_resizing": 0.5,
            "pruning": 1.1,
        },
        baseline_step_time_s=0.2,
        last=100,
        samples_per_step=64,
        seconds_per_step=0.25,
        conflicts={"mixup+cutmix": "both write batch['targets'] | pick one"},
        suite="shapes2d-named",
        workload={"recipe": "shapes2d-baseline", "overrides": ["data.train_samples=512"]},
        environment={"torch": "2.5.0", "hardware": {"cpu": "test cpu", "cores": 2}},
    )
    for run in results["runs"]:
        run["cached"] = run["seed"] == 2
    return results


def test_write_report_writes_tables_and_three_pngs(tmp_path):
    results = results_payload()
    report = write_report(tmp_path, results)
    text = report.read_text(encoding="utf-8")
    assert report == tmp_path / "report.md"
    assert "# Composition benchmark: shapes2d-named" in text
    assert "| config | seeds reaching target | steps to target |" in text
    # Calibrated: baseline 70 steps x 1.0 x 0.2 s = 14 s; resizing 70 x 0.5 x 0.2 = 7 s.
    assert "| baseline | 2/2 | 70 ± 14 | 14 ± 2.8 | 17.5 ± 3.5 | 1.00× [" in text
    assert "| progressive_resizing | 2/2 | 70 ± 14 | 7 ± 1.4 | 17.5 ± 3.5 | 2.00× [" in text
    assert "| pruning | 0/2 | ∞ | ∞ | ∞ | 0.00× | 0.00× | 0.38 ± 0 |" in text
    # Pair: 14 / (50 x 0.5 x 0.2 = 5) = 2.8 vs 14/12 x 2 = 2.333: interaction 1.2.
    assert "| label_smoothing+progressive_resizing | 1.17× | 2.00× | 2.33× | 2.80× | 1.20" in text
    sections = ["## Curves", "## Interactions", "## Pareto set", "## Conflicts", "## Environment"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
    pareto = text[text.index("## Pareto set") : text.index("## Conflicts")]
    assert "| label_smoothing+progressive_resizing | 5 | time to target | 0.92 |" in pareto
    assert "| label_smoothing | " in pareto and "| baseline |" not in pareto
    assert "| mixup+cutmix | both write batch['targets'] \\| pick one |" in text
    assert "- hardware.cores: 2" in text and "- torch: 2.5.0" in text
    for name in ("curves.png", "pareto.png", "interaction.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    assert analysis["configs"]["pruning"]["calibrated_time_to_target_s"]["mean"] == "inf"
    assert analysis["configs"]["progressive_resizing"]["speedup_calibrated"]["point"] == 2.0


def test_rebuild_reproduces_the_report_byte_for_byte(tmp_path):
    results = results_payload()
    first = write_report(tmp_path / "a", results).read_bytes()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(results, indent=2))
    assert rebuild(tmp_path / "b").read_bytes() == first
    again = rebuild(tmp_path / "b").read_bytes()
    assert again == first
    # The CLI's `speedup report DIR` goes through rebuild.
    (tmp_path / "b" / "report.md").unlink()
    assert main(["report", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "report.md").read_bytes() == first


def test_rebuild_without_results_json_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        rebuild(tmp_path)


def test_single_seed_without_pairs_still_writes_every_file(tmp_path):
    results = results_payload()
    results["runs"] = [
        r for r in results["runs"] if r["seed"] == 1 and r["config"] in ("baseline", "pruning")
    ]
    results["seeds"] = [1]
    results["conflicts"] = {}
    results["environment"] = {}
    text = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert "| baseline | 1/1 | 60 | 12 | 15 | 1.00× | 1.00× | 0.91 |" in text
    assert "One seed per configuration" in text
    assert "No pair was run together" in text
    assert "None: every requested combination composed." in text
    assert "Not recorded." in text
    for name in ("curves.png", "pareto.png", "interaction.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    assert not math.isnan(json.loads((tmp_path / "analysis.json").read_text())["confidence"])
