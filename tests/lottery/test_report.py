"""Summaries over seeds: the sample standard deviation (ddof=1), printed with n."""

from __future__ import annotations

import math

import pytest
from speedup.lottery.report import average_rows, format_spread, markdown_table, mean_spread


def _row(level: int, ticket: float | None, random: float) -> dict:
    return {
        "level": level,
        "density": 0.8**level,
        "accuracy": {"ticket": ticket, "random": random},
        "early_stop_step": 10 * (level + 1),
    }


def _sample_std(values: list[float]) -> float:
    """Written out from the definition: squared deviations over n - 1."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_mean_spread_is_the_bessel_corrected_deviation():
    values = [0.91, 0.87, 0.95, 0.90]
    mean, std, n = mean_spread(values)
    assert n == 4 and mean == pytest.approx(sum(values) / 4)
    assert std == pytest.approx(_sample_std(values))
    population = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    assert std > population  # not the population deviation the summaries used to print
    assert mean_spread([0.5]) == (0.5, None, 1)  # one value has no spread
    assert mean_spread([]) == (None, None, 0)


def test_format_spread_prints_n():
    assert format_spread(0.912, 0.004, 3) == "0.9120 ± 0.0040 (n=3)"
    assert format_spread(91.2, 0.4, 3, digits=1) == "91.2 ± 0.4 (n=3)"
    assert format_spread(0.9, None, 1) == "0.9000 (n=1)"
    assert format_spread(None, None, 0) == "-"


def test_average_rows_and_the_table_over_three_seeds():
    runs = [
        [_row(0, 0.90, 0.90), _row(1, 0.80, 0.70)],
        [_row(0, 0.92, 0.92), _row(1, 0.85, 0.75)],
        [_row(0, 0.94, 0.94), _row(1, None, 0.65)],  # a seed without a ticket accuracy
    ]
    rows = average_rows(runs)
    assert rows[1]["accuracy_n"] == {"ticket": 2, "random": 3}
    assert rows[1]["accuracy"]["ticket"] == pytest.approx(0.825)
    assert rows[1]["accuracy_std"]["ticket"] == pytest.approx(_sample_std([0.80, 0.85]))
    assert rows[1]["accuracy_std"]["random"] == pytest.approx(0.05)  # (0.7, 0.75, 0.65)
    assert rows[0]["accuracy_std"]["ticket"] == pytest.approx(0.02)
    table = markdown_table(rows)
    assert "| 1 | 0.8000 | 0.8250 ± 0.0354 (n=2) | 0.7000 ± 0.0500 (n=3) | 20 |" in table
    assert "| 0 | 1.0000 | 0.9200 ± 0.0200 (n=3) | 0.9200 ± 0.0200 (n=3) | 10 |" in table


def test_a_single_run_table_has_no_spread():
    table = markdown_table([_row(0, 0.9, 0.8)])
    assert "| 0 | 1.0000 | 0.9000 | 0.8000 | 10 |" in table and "±" not in table
