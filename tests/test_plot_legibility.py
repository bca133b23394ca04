"""The report plots read at a glance: no label covers another, legends sit beside the data
instead of squeezing it, log axes are labelled in plain numbers. Checked on the drawn figure,
with the bounding boxes matplotlib's renderer gives each text (``get_window_extent``)."""

from __future__ import annotations

import itertools
import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _helpers import rising_curve  # noqa: E402
from speedup.benchmarks.analysis import analyze  # noqa: E402
from speedup.benchmarks.report import plot_curves, plot_pareto  # noqa: E402
from speedup.lottery.report import density_ticks, plot_accuracy_vs_density  # noqa: E402

ALGORITHMS = ["label_smoothing", "progressive_resizing", "magnitude_pruning", "rewinding", "ema"]


def sweep(seed: int = 3) -> dict:
    """A full sweep of five algorithms (baseline, singles, pairs, all five: 17 configurations,
    2 seeds), with final accuracies and crossing steps close together, as real sweeps have."""
    rng = random.Random(seed)
    pairs = ["+".join(p) for p in itertools.combinations(ALGORITHMS, 2)]
    configs = ["baseline", *ALGORITHMS, *pairs, "+".join(ALGORITHMS)]
    runs, cost = [], {}
    for config in configs:
        cost[config] = round(rng.uniform(0.8, 1.1), 3)
        final = round(rng.uniform(0.88, 0.93), 3)
        for seed_ in (1, 2):
            cross = 60 if config == "baseline" else rng.choice([50, 60, 60, 70, None])
            runs.append(
                {
                    "config": config,
                    "algorithms": [] if config == "baseline" else config.split("+"),
                    "seed": seed_,
                    "config_hash": f"{configs.index(config):08d}",
                    "run_dir": f"runs/x/{configs.index(config)}",
                    "cached": False,
                    "curve": rising_curve(
                        cross, last=100, samples_per_step=64, seconds_per_step=0.25
                    ),
                    "final": {"accuracy": final, "loss": 0.3},
                    "steps": 100,
                    "train_time_s": 25.0,
                    "eval_time_s": 2.0,
                }
            )
    return {
        "suite": "shapes2d-named",
        "workload": {"recipe": "shapes2d-baseline"},
        "target": {"metric": "accuracy", "value": 0.5, "higher_is_better": True},
        "seeds": [1, 2],
        "environment": {},
        "baseline_step_time_s": 0.2,
        "step_cost": cost,
        "conflicts": {},
        "runs": runs,
    }


def box(artist, renderer) -> tuple[float, float, float, float]:
    extent = artist.get_window_extent(renderer)
    return extent.x0, extent.y0, extent.x1, extent.y1


def overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def inside(a, b) -> bool:
    return a[0] >= b[0] and a[1] >= b[1] and a[2] <= b[2] and a[3] <= b[3]


@pytest.fixture(scope="module")
def results_and_analysis():
    results = sweep()
    return results, analyze(results)


def test_pareto_names_never_overlap_each_other_or_a_point(results_and_analysis, tmp_path):
    results, analysis = results_and_analysis
    fig = plot_pareto(results, analysis, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    names = [text for text in ax.texts if text.get_text()]
    boxes = [box(text, renderer) for text in names]
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not overlap(a, b), (names[i].get_text(), names[j].get_text())
    area = box(ax, renderer)
    assert all(inside(b, area) for b in boxes)  # nothing cut off at the axes' edge
    for point in analysis["pareto"]["points"]:  # no name covers a point (its marker's centre)
        x, y = ax.transData.transform((point["time_s"], point["quality"]))
        for text, b in zip(names, boxes, strict=True):
            assert not (b[0] < x < b[2] and b[1] < y < b[3]), (text.get_text(), point["config"])
    labelled = {text.get_text() for text in names}
    # The points that matter most are named on the plot itself.
    assert "baseline" in labelled and set(analysis["pareto"]["frontier"]) <= labelled
    # Every configuration is in the legend, whose entries do not overlap either.
    (legend,) = fig.legends
    entries = [t for t in legend.get_texts()]
    assert {t.get_text().replace("\n", "") for t in entries} >= set(analysis["configs"])
    for a, b in itertools.combinations([box(t, renderer) for t in entries], 2):
        assert not overlap(a, b)
    assert not overlap(box(legend, renderer), area)


def test_curves_legend_sits_below_and_leaves_the_axes_their_width(results_and_analysis, tmp_path):
    results, analysis = results_and_analysis
    fig = plot_curves(results, analysis, tmp_path / "curves.png")
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    (legend,) = fig.legends
    area, key = box(ax, renderer), box(legend, renderer)
    width = fig.get_figwidth() * fig.dpi
    assert area[2] - area[0] > 0.8 * width  # the old legend at the right took a third
    assert key[3] <= box(ax.xaxis.label, renderer)[1]  # wholly below the axis label
    assert inside(key, (0, 0, width, fig.get_figheight() * fig.dpi))  # and inside the figure
    entries = [box(t, renderer) for t in legend.get_texts()]
    assert not any(overlap(a, b) for a, b in itertools.combinations(entries, 2))
    shown = {t.get_text().replace("\n", "") for t in legend.get_texts()}
    assert shown == {*analysis["configs"], "target"}


def imp_rows(levels: int, fraction: float = 0.2) -> list[dict]:
    rows = []
    for level in range(levels + 1):
        control = None if level == 0 else 0.9 - 0.01 * level
        rows.append(
            {
                "level": level,
                "density": (1 - fraction) ** level,
                "accuracy": {"ticket": 0.9 - 0.001 * level, "reinit": control},
            }
        )
    return rows


@pytest.mark.parametrize("levels", [3, 20])
def test_lottery_density_axis_is_labelled_in_plain_percentages(tmp_path, levels):
    rows = imp_rows(levels)
    fig = plot_accuracy_vs_density(rows, tmp_path / "imp.png")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    labels = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
    texts = [t.get_text() for t in labels]
    assert texts[0] == "100%" and all(t.endswith("%") for t in texts), texts
    assert not any("$" in t or "times" in t or "^" in t for t in texts)  # no 9x10^-1
    sparsest = rows[-1]["density"]
    assert texts[-1] == f"{100 * sparsest:.3g}%"  # the last level is marked
    for a, b in itertools.combinations([box(t, renderer) for t in labels], 2):
        assert not overlap(a, b)
    assert ax.get_xaxis().get_minorticklabels() == [] or not any(
        t.get_text() for t in ax.get_xaxis().get_minorticklabels()
    )


def test_density_ticks_are_the_measured_densities_thinned_evenly():
    densities = [0.8**k for k in range(21)]
    ticks = density_ticks(densities, max_ticks=8)
    assert ticks[0] == 1.0 and ticks[-1] == densities[-1]
    assert set(ticks) <= set(densities) and len(ticks) <= 9
    span = math.log10(densities[0] / densities[-1])
    steps = [math.log10(a / b) for a, b in itertools.pairwise(ticks)]
    assert min(steps) >= span / 8 - 1e-9  # never crowded
    assert density_ticks([0.5]) == [0.5] and density_ticks([]) == []
    assert density_ticks([1.0, 0.8, 0.64]) == [1.0, 0.8, 0.64]  # few levels: each marked
