"""Seed a methods study with what a ``speedup bench`` sweep measured (``--seed-from DIR``).

A composition sweep (``speedup bench``) measures singles and pairs of algorithms against a
baseline on the same workload. Its best configurations are the natural first trials of a
search: Optuna's ``enqueue_trial`` runs them before the sampler draws anything, so the
search starts from evidence instead of from random draws (``research/search-and-records.md``,
Part 2, "Warm starts"). Each measured configuration that beat its baseline is enqueued
twice: at the full budget, and at the budget where its speedup says it should reach the
target (``1.25 / speedup``, clamped to the space), since most of a speedup recipe's gain is a
shorter schedule. Algorithms the space does not hold are dropped from a configuration (a
configuration left with none is skipped); arguments the sweep used are kept where the
space declares them and they lie in range, the rest are left to the sampler.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from speedup.tuning.space import Space

from speedup.errors import ConfigError

__all__ = ["bench_seeds"]


def _in_range(value: Any, spec: dict[str, Any]) -> bool:
    if spec["type"] == "categorical":
        return value in spec["choices"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return spec["low"] <= value <= spec["high"]


def bench_seeds(
    bench_dir: str | Path, space: Space, lr: float, top: int = 4
) -> list[dict[str, Any]]:
    """Optuna parameter dicts for the ``top`` best configurations of a bench sweep in
    ``bench_dir`` (its ``analysis.json`` and ``results.json``), best first."""
    root = Path(bench_dir)
    try:
        analysis = json.loads((root / "analysis.json").read_text())
        results = json.loads((root / "results.json").read_text())
    except FileNotFoundError as err:
        raise ConfigError(
            f"--seed-from: {err.filename} not found: give the output directory of a finished "
            "`speedup bench` run (it holds analysis.json and results.json)"
        ) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--seed-from: {root}: unreadable JSON ({err})") from None
    swept_args = results.get("algorithms") or {}
    ranked = []
    for name, stats in analysis.get("configs", {}).items():
        point = (stats.get("speedup_calibrated") or {}).get("point")
        if name == analysis.get("baseline") or not point or point <= 1.0:
            continue
        names = [n for n in name.split("+") if n in space.algorithms]
        if names:
            ranked.append((float(point), names))
    ranked.sort(key=lambda item: -item[0])
    seeds, seen = [], set()
    for point, names in ranked:
        if tuple(names) in seen:
            continue
        seen.add(tuple(names))
        base: dict[str, Any] = {f"use.{n}": n in names for n in space.algorithms}
        for n in names:
            for arg, spec in space.algorithms[n].items():
                value = (swept_args.get(n) or {}).get(arg)
                if "unit" not in spec and value is not None and _in_range(value, spec):
                    base[f"{n}.{arg}"] = value
        low, high = space.budget
        short = min(max(1.25 / point, low), high)
        for budget in dict.fromkeys([high, short]):
            params = {**base, "lr": min(max(lr, space.lr[0]), space.lr[1])}
            if high > low:
                params["budget"] = budget
            if space.optimizers:
                params["optimizer"] = space.optimizers[0]
            seeds.append(params)
        if len(seen) >= top:
            break
    return seeds
