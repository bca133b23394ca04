"""Per-step time of every algorithm relative to its baseline, on its embedded workload (CPU).

This is the throughput side of each speedup, to read the harness's time-to-accuracy numbers
against: an algorithm that reaches the target in fewer steps but costs 1.3x per step needs
30% fewer steps to break even. Each algorithm runs with its default arguments on the
embedded workload it applies to (ResNet-20 on Shapes-2D for vision and model-agnostic
algorithms; tiny GPT-2 or BERT on the stdlib corpus for language ones), timed at a point of
the run where it is active (e.g. 0.8 of the run for SWA, 0.1 for sequence-length warmup),
baseline and algorithm alternating, medians of several repeats (harness.measure_step_costs).
Rewinding is left out: it acts only at the step where masks change.

Run: ``python -m speedup.benchmarks.catalogue_costs [--only NAME ...] [--repeats N]``. The
last line is machine-readable: ``<name>=<ratio> ...``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from speedup.benchmarks.harness import Suite, measure_step_costs

from speedup.algorithm import ALGORITHMS

IMAGE = ("shapes2d-baseline", [])
GPT = ("stdlib-gpt", [])
BERT = ("stdlib-bert", [])

#: name -> (workload, extra overrides for baseline and algorithm alike, algorithm arguments,
#: position in the run to time at)
SETUPS: dict[str, tuple[tuple[str, list[str]], list[str], dict, float]] = {
    "alibi": (GPT, [], {}, 0.5),
    "gated_linear_units": (BERT, [], {}, 0.5),
    "seq_length_warmup": (GPT, [], {}, 0.1),
    "low_precision_layernorm": (GPT, ["precision=bf16"], {}, 0.5),
    "low_precision_groupnorm": (IMAGE, ["precision=bf16", "model.norm=group"], {}, 0.5),
    "gyro_dropout": (GPT, ["model.dropout=0.1"], {"sigma": 16, "tau": 4}, 0.5),
    "swa": (IMAGE, [], {"update_interval": "1ba"}, 0.8),
    "selective_backprop": (IMAGE, [], {"interval": 1}, 0.6),
    "layer_freezing": (IMAGE, [], {}, 0.95),
    "progressive_resizing": (IMAGE, [], {}, 0.2),
    "magnitude_pruning": (IMAGE, [], {"sparsity": 0.9, "at": "0ba"}, 0.5),
    "alternating_flip": (IMAGE, [], {}, 0.5),
    "whitening_init": (IMAGE, [], {}, 0.5),  # past its bias phase: the first conv is frozen
    "muon": (IMAGE, [], {}, 0.5),
    "lookahead": (IMAGE, [], {}, 0.5),
    # It replaces the LR schedule and refuses one: both arms at a constant LR (same step cost).
    "schedule_free": (IMAGE, ["scheduler.name=constant"], {}, 0.5),
    "rotary": (GPT, [], {}, 0.5),
    "qk_norm": (GPT, [], {}, 0.5),
    "relu_squared": (GPT, [], {}, 0.5),
    # In its first stage (a third of each batch): the cost of a warmup step, not a full one.
    "batch_size_warmup": (GPT, [], {}, 0.2),
}
SKIPPED = {
    "rewinding": "acts only when masks change",
    "test_time_augmentation": "acts only at evaluation; each eval logs its cost as tta/seconds",
}


def setup(name: str) -> tuple[tuple[str, list[str]], list[str], dict, float]:
    return SETUPS.get(name, (IMAGE, [], {}, 0.5))


def measure(name: str, steps: int, repeats: int, out: Path) -> tuple[float, float]:
    """(baseline seconds per step, the algorithm's per-step time ratio)."""
    (recipe, overrides), extra, args, position = setup(name)
    suite = Suite(
        name=f"cost-{name}",
        path=Path.cwd() / "catalogue_costs.yaml",
        recipe=recipe,
        overrides=[*overrides, *extra, "threads=1"],
        metric="accuracy",
        target=1.0,
        algorithms={name: args},
        seeds=[17],
        budget="",
        combinations=[],
        timing={"steps": steps, "repeats": repeats, "positions": [position]},
    )
    base, ratios = measure_step_costs(suite, [[name]], out)
    return base, ratios[name]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="algorithm names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    names = args.only or [n for n in ALGORITHMS.names() if n not in SKIPPED]
    print(
        f"per-step time ratio vs baseline, {args.steps} steps x {args.repeats} repeats, "
        f"1 thread, torch {torch.__version__}"
    )
    print(f"{'algorithm':<26} {'workload':<18} {'at':>5} {'base ms':>9} {'ratio':>7}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            (recipe, _), _, _, position = setup(name)
            base, ratio = measure(name, args.steps, args.repeats, Path(tmp))
            results[name] = ratio
            print(f"{name:<26} {recipe:<18} {position:>5.2f} {base * 1e3:>9.1f} {ratio:>7.3f}")
    for name, why in SKIPPED.items():
        print(f"{name:<26} (not timed: {why})")
    print(" ".join(f"{k}={v:.3f}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
