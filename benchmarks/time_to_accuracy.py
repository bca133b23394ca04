"""Time-to-accuracy of the named speedups against the baseline on the embedded image workload.

Runs ``shapes2d-baseline`` and each recipe that adds one named speedup (and all four
together), evaluating every epoch, and reports for each the training seconds and steps until
the eval accuracy first reaches ``--target``, the final accuracy, and the speedup in
time-to-target over the baseline. Wall-clock on shared machines is noisy (see
docs/design-notes.md); steps-to-target is reported next to it because it is not.

Run: ``python -m speedup.benchmarks.time_to_accuracy [--target 0.9] [--seeds 17]
[--out DIR] [key=value ...]``; overrides apply to every recipe. The last line is
machine-readable: ``<recipe>_tta_s=<float> ...`` (``inf`` where the target was not reached).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from speedup.config import load_config
from speedup.run import run_config

RECIPES = (
    "shapes2d-baseline",
    "shapes2d-label-smoothing",
    "shapes2d-progressive-resizing",
    "shapes2d-pruning",
    "shapes2d-rewinding",
    "shapes2d-named-four",
)


def time_to_target(metrics_path: Path, target: float) -> tuple[float, float]:
    """(training seconds, steps) at the first evaluation reaching ``target``; inf if never."""
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("eval/accuracy", -1.0) >= target:
            return record["train_time_s"], record["step"]
    return math.inf, math.inf


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, nargs="+", default=[17])
    parser.add_argument("--out", default="runs/time_to_accuracy")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    rows = {}
    for recipe in args.recipes:
        times, steps, finals = [], [], []
        for seed in args.seeds:
            run_dir = Path(args.out) / f"{recipe}-seed{seed}"
            overrides = [
                *args.overrides,
                f"seed={seed}",
                "eval_interval=1ep",
                f"run_dir={run_dir}",
                "progress_bar=false",
            ]
            summary = run_config(load_config(recipe, overrides))
            seconds, step = time_to_target(run_dir / "metrics.jsonl", args.target)
            times.append(seconds)
            steps.append(step)
            finals.append(summary["metrics"]["accuracy"])
        rows[recipe] = (
            statistics.median(times),
            statistics.median(steps),
            statistics.median(finals),
        )
    base_time = rows.get("shapes2d-baseline", (math.nan,))[0]
    print(f"target accuracy {args.target}, seeds {args.seeds} (medians)")
    print(f"{'recipe':32} {'tta_s':>8} {'steps':>6} {'final':>6} {'speedup':>8}")
    for recipe, (seconds, step, final) in rows.items():
        speedup = base_time / seconds if math.isfinite(seconds) else 0.0
        print(f"{recipe:32} {seconds:8.1f} {step:6.0f} {final:6.3f} {speedup:7.2f}x")
    results = {f"{r.replace('-', '_')}_tta_s": v[0] for r, v in rows.items()}
    print(" ".join(f"{k}={v:.2f}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
