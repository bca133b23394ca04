"""Steps-to-target of algorithm variants side by side on the embedded image workload.

Compares the variants of two algorithms whose defaults were chosen by measurement (issue 14):
progressive resizing's downscaling filter (``nearest`` against ``bilinear_antialias``, recipe
``shapes2d-progressive-resizing``) and selective backprop's selection rule (Jiang et al.'s
``probabilistic`` against ``topk``), each next to ``shapes2d-baseline``, for every seed.

Every variant trains the same workload: the recipe plus ``WORKLOAD`` (the recipes' data and
optimizer with a 16-channel SmallCNN in place of their ResNet-20, for 5 epochs: small enough
for a loaded two-core machine) plus any ``key=value``
overrides given on the command line. The table reports, per variant, the steps at which the
eval accuracy first reaches ``--target`` (interpolated between evaluations, as the harness
does: :func:`speedup.benchmarks.analysis.time_to_target` on the harness's curve of
``metrics.jsonl``), for each seed and their mean (``inf`` if a seed never reaches it), the
ratio of that mean to the baseline's (below 1: fewer steps), and the mean final accuracy.
Steps, not seconds: step counts do not depend on the machine's load; the variants of one
algorithm cost about the same per step (selective backprop's two rules backpropagate about the same
number of samples at their defaults, ``keep=0.5`` and ``beta=1``).

Run directories are named by the hash of their resolved config, so an interrupted measurement
resumes and a finished run is not recomputed.

The defaults reproduce the figures in the two method cards (target 0.3: what the baseline
reaches on both seeds at this budget; it ends near 0.35). Ten runs of 390 steps each took
about 40 minutes on a two-core machine shared with several other jobs (load average 9-15).

Run: ``python -m speedup.benchmarks.algorithm_variants [--seeds 1 2] [--target 0.3]
[--variants NAME ...] [--out DIR] [--tiny] [key=value ...]``. ``--tiny`` shrinks everything
to seconds (for tests). The last line is machine-readable: ``<variant>_steps=<float> ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from speedup.benchmarks.analysis import time_to_target
from speedup.benchmarks.harness import metric_curve

from speedup.config import config_hash, load_config
from speedup.run import run_config

__all__ = ["VARIANTS", "WORKLOAD", "TINY", "measure", "main"]

_RESIZING = "algorithms.progressive_resizing.interpolation"
_SELECTIVE = "algorithms.selective_backprop"
#: name -> (recipe, overrides). Selective backprop keeps its default window (0.5-0.9 of the
#: run, every other step).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("shapes2d-baseline", []),
    "resizing-nearest": ("shapes2d-progressive-resizing", [f"{_RESIZING}=nearest"]),
    "resizing-bilinear_antialias": (
        "shapes2d-progressive-resizing",
        [f"{_RESIZING}=bilinear_antialias"],
    ),
    "selective-probabilistic": (
        "shapes2d-baseline",
        [f"{_SELECTIVE}.selection=probabilistic", f"{_SELECTIVE}.beta=1"],
    ),
    "selective-topk": (
        "shapes2d-baseline",
        [f"{_SELECTIVE}.selection=topk", f"{_SELECTIVE}.keep=0.5"],
    ),
}
#: The measured workload, sized for a loaded two-core CPU: the recipes' data (Shapes-2D, 10k
#: training images, batch 128) and optimizer (SGD with Nesterov momentum, lr 0.1, cosine), with
#: the 16-channel four-layer SmallCNN in place of ResNet-20 (about 6x fewer FLOPs per image)
#: for 5 epochs (390 steps), evaluated every half epoch on 1000 test images; one thread (an
#: oversubscribed CPU trains faster so), no checkpoints.
WORKLOAD = [
    "model.name=small_cnn",
    "model.channels=16",
    "max_duration=5ep",
    "eval_interval=39ba",
    "data.eval_samples=1000",
    "threads=1",
    "checkpoint.interval=0ba",
    "checkpoint.save_final=false",
    "progress_bar=false",
]
#: ``--tiny``: a few steps of a 4-channel SmallCNN on 128 images (seconds; tests).
TINY = [
    "model.name=small_cnn",
    "model.channels=4",
    "data.num_train=128",
    "data.num_test=64",
    "data.batch_size=32",
    "data.eval_samples=64",
    "max_duration=4ba",
    "eval_interval=2ba",
    "checkpoint.interval=0ba",
    "checkpoint.save_final=false",
    "progress_bar=false",
]


def measure(
    variants: list[str],
    seeds: list[int],
    target: float,
    out: Path,
    overrides: list[str],
) -> dict[str, dict]:
    """Train every variant for every seed (or reuse a finished run); per variant, the
    per-seed steps-to-target (None: not reached) and final accuracies."""
    rows: dict[str, dict] = {}
    for name in variants:
        recipe, own = VARIANTS[name]
        steps, finals = [], []
        for seed in seeds:
            cfg = load_config(recipe, [*overrides, *own, f"seed={seed}"])
            cfg.run_dir = str(out / f"{name}-seed{seed}-{config_hash(cfg)}")
            summary_path = Path(cfg.run_dir) / "summary.json"
            if summary_path.exists():
                summary = json.loads(summary_path.read_text())
            else:
                summary = run_config(cfg)
            curve = metric_curve(Path(cfg.run_dir), "accuracy")
            steps.append(time_to_target(curve, target, x="step"))
            finals.append(float(summary["metrics"]["accuracy"]))
        rows[name] = {"steps_to_target": steps, "final_accuracy": finals}
    return rows


def _mean_steps(values: list[float | None]) -> float:
    # A seed that never reaches the target counts as infinite (the harness's convention).
    return statistics.fmean(math.inf if v is None else v for v in values)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", default="runs/algorithm_variants")
    parser.add_argument("--tiny", action="store_true", help="a few steps per run (tests)")
    parser.add_argument("overrides", nargs="*", help="key=value, applied to every run")
    args = parser.parse_args(argv)
    workload = [*(TINY if args.tiny else WORKLOAD), *args.overrides]
    rows = measure(args.variants, args.seeds, args.target, Path(args.out), workload)

    base = _mean_steps(rows["baseline"]["steps_to_target"]) if "baseline" in rows else math.nan
    print(f"steps to eval accuracy {args.target} on shapes2d, seeds {args.seeds}")
    print(f"workload: {' '.join(workload)}")
    seeds_header = " ".join(f"{'seed ' + str(s):>8}" for s in args.seeds)
    print(f"{'variant':28} {seeds_header} {'mean':>8} {'vs base':>8} {'final acc':>9}")
    results = {}
    for name, row in rows.items():
        per_seed = " ".join(
            f"{'inf' if v is None else f'{v:.1f}':>8}" for v in row["steps_to_target"]
        )
        mean = _mean_steps(row["steps_to_target"])
        ratio = mean / base if math.isfinite(mean) and math.isfinite(base) and base else math.nan
        final = statistics.fmean(row["final_accuracy"])
        print(f"{name:28} {per_seed} {mean:8.1f} {ratio:8.3f} {final:9.4f}")
        results[f"{name.replace('-', '_')}_steps"] = mean
    print(" ".join(f"{k}={v:.1f}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
