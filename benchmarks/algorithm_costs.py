"""Per-step cost of the named speedups on the embedded image workload.

* magnitude pruning at 90% sparsity (masks re-applied after every step) vs unpruned training;
* progressive resizing held at scale 0.5 vs full resolution.

Each pair is timed interleaved (A, B, A, B, ...) in one process, several repeats, medians of
the per-step time; the first pair is a discarded warm-up. Run:
``python -m speedup.benchmarks.algorithm_costs [--repeats N] [--steps N]``. The last line is
machine-readable: ``pruning_step_ratio=<float> resizing_step_ratio=<float>``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from speedup.algorithm import ALGORITHMS, Algorithm
from speedup.data import DATASETS, build_dataloaders
from speedup.models import MODELS, build_model
from speedup.trainer import Trainer


def _workload(resolution: int):  # noqa: ANN202
    splits = DATASETS.get("shapes2d")(resolution=resolution, num_train=2048, num_test=256)
    train, _ = build_dataloaders(splits, batch_size=64, seed=0)
    return splits.info, train


def _step_time(
    info,
    train,
    model_name: str,
    algorithms: Callable[[], list[Algorithm]],
    steps: int,
) -> float:
    torch.manual_seed(0)
    trainer = Trainer(
        build_model(model_name, info),
        train,
        f"{steps}ba",
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        algorithms=algorithms(),
        log_interval="0ba",
        device="cpu",
        data_kind=info.kind,
    )
    start = time.perf_counter()
    trainer.fit()
    return (time.perf_counter() - start) / steps


def interleaved(
    info,
    train,
    model_name: str,
    a: Callable,
    b: Callable,
    steps: int,
    repeats: int,
) -> tuple[float, float]:
    times_a, times_b = [], []
    for repeat in range(repeats + 1):
        ta = _step_time(info, train, model_name, a, steps)
        tb = _step_time(info, train, model_name, b, steps)
        if repeat:
            times_a.append(ta)
            times_b.append(tb)
    return statistics.median(times_a), statistics.median(times_b)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args(argv)
    model_name = "resnet20" if "resnet20" in MODELS else "small_cnn"
    info, train = _workload(args.resolution)
    pruning = ALGORITHMS.get("magnitude_pruning")
    resizing = ALGORITHMS.get("progressive_resizing")
    print(
        f"{model_name} on shapes2d {args.resolution}px, batch 64, {args.steps} steps, "
        f"{args.repeats} interleaved repeats, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )

    # Per speedup: its result key, its printed label, the names of the two arms, and the
    # algorithms of the second arm (the first trains without any).
    comparisons = (
        (
            "pruning_step_ratio",
            "pruning 90%: ",
            ("dense", "pruned"),
            lambda: [pruning(sparsity=0.9, at="0ba", scope="global")],
        ),
        (
            "resizing_step_ratio",
            "resizing 0.5:",
            ("full", "half"),
            lambda: [resizing(initial_scale=0.5, delay="1dur", finetune="0dur")],
        ),
    )
    results = {}
    for key, label, (without, with_it), algorithms in comparisons:
        a, b = interleaved(
            info, train, model_name, lambda: [], algorithms, args.steps, args.repeats
        )
        results[key] = b / a
        print(
            f"{label} {without} {a * 1e3:7.2f} ms/step  {with_it} {b * 1e3:7.2f} ms/step  "
            f"ratio {b / a:.4f}"
        )
    print(" ".join(f"{k}={v:.4f}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
