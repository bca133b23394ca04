"""How fast data reaches the model, and how much of a training step waits for it.

(a) Loader throughput on the embedded image set (Shapes-2D, uint8 in memory): samples/s of
    one shuffled epoch with the train transform (random flip + normalisation) through

    * a torch ``DataLoader`` over the per-sample view (:class:`Shapes2DDataset`), collating
      then applying the transform to the batch, with ``num_workers`` 0 and 2;
    * speedup's :class:`TensorBatchLoader`, which slices batches out of the tensors.

    Each loader runs one warm-up epoch (worker start-up, allocator) and then ``--passes``
    timed epochs; the median is reported.

(b) Data wait in a real training loop: the quickstart recipe (MNIST-1D CNN) is built with
    :func:`speedup.run.build_trainer` for a short run, with a callback that times
    BEFORE_DATALOADER -> AFTER_DATALOADER (drawing the batch: ``next(iterator)`` plus the
    move to the device) against BATCH_START -> next BATCH_START (the whole step).

Run: ``python -m speedup.benchmarks.data_throughput [--passes N] [--steps N]``. The last line
is machine-readable: ``key=value`` pairs (samples/s, milliseconds and fractions).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, default_collate

from speedup.callback import CALLBACKS, Callback
from speedup.data import TensorBatchLoader
from speedup.data.shapes2d import Shapes2DDataset, shapes2d

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["DataWaitTimer", "loader_throughput", "data_wait", "main"]


class CollateThenTransform:
    """``default_collate`` then a batch transform; a top-level class so workers can pickle it."""

    def __init__(self, transform: Callable[[dict], dict]) -> None:
        self.transform = transform

    def __call__(self, samples: list[dict]) -> dict:
        return self.transform(default_collate(samples))


def _epoch_seconds(loader: Iterable[Any]) -> tuple[float, int]:
    """Seconds to draw every batch of one epoch, and the number of samples drawn."""
    count = 0
    start = time.perf_counter()
    for batch in loader:
        count += int(batch["targets"].shape[0])
    return time.perf_counter() - start, count


def loader_throughput(loader: Iterable[Any], passes: int) -> float:
    """Median samples/s over ``passes`` epochs, after one warm-up epoch."""
    _epoch_seconds(loader)
    rates = []
    for epoch in range(passes):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch + 1)
        seconds, count = _epoch_seconds(loader)
        rates.append(count / seconds)
    return statistics.median(rates)


@CALLBACKS.register("data_wait_timer")
class DataWaitTimer(Callback):
    """Times the wait for each batch against the whole step (BATCH_START to BATCH_START).

    ``skip`` first steps are ignored (warm-up). Per measured step ``i``, ``waits[i]`` is the
    time spent drawing batch ``i`` and ``steps[i]`` the time from batch ``i-1``'s BATCH_START
    to batch ``i``'s, which contains that wait.
    """

    def __init__(self, skip: int = 5) -> None:
        self.skip = skip
        self.waits: list[float] = []
        self.steps: list[float] = []
        self._drawn_at = 0.0
        self._last_start: float | None = None
        self._wait = 0.0
        self._seen = 0

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self._drawn_at = time.perf_counter()

    def after_dataloader(self, state: State, logger: Logger) -> None:
        self._wait = time.perf_counter() - self._drawn_at

    def batch_start(self, state: State, logger: Logger) -> None:
        now = time.perf_counter()
        if self._last_start is not None and self._seen > self.skip:
            self.waits.append(self._wait)
            self.steps.append(now - self._last_start)
        self._last_start = now
        self._seen += 1

    def wait_fraction(self) -> float:
        return sum(self.waits) / max(sum(self.steps), 1e-12)


def data_wait(recipe: str, steps: int) -> DataWaitTimer:
    """Train ``recipe`` for ``steps`` batches (no eval until the end); return the timer."""
    from speedup.config import load_config
    from speedup.run import build_trainer

    overrides = [
        f"max_duration={steps}ba",
        "eval_interval=0ba",
        "log_interval=0ba",
        "progress_bar=false",
        "device=cpu",
        "callbacks={data_wait_timer: {}}",
    ]
    trainer = build_trainer(load_config(recipe, overrides))
    timer = next(c for c in trainer.state.callbacks if isinstance(c, DataWaitTimer))
    trainer.fit()
    return timer


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5, help="timed epochs per loader")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--num-train", type=int, default=10000)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    parser.add_argument("--recipe", default="quickstart", help="recipe for the data-wait part")
    parser.add_argument("--steps", type=int, default=300, help="training steps for (b)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    splits = shapes2d(resolution=args.resolution, num_train=args.num_train, num_test=0)
    train, transform = splits.train, splits.train_transform
    results: dict[str, float] = {}
    rows: list[tuple[str, float]] = []
    for workers in args.workers:
        loader = DataLoader(
            Shapes2DDataset(train),
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=CollateThenTransform(transform),
            generator=torch.Generator().manual_seed(0),
        )
        rate = loader_throughput(loader, args.passes)
        results[f"dataloader_w{workers}_samples_per_s"] = rate
        rows.append((f"DataLoader, per-sample view, num_workers={workers}", rate))
        del loader  # stops persistent workers
    tensor_loader = TensorBatchLoader(
        train, args.batch_size, shuffle=True, drop_last=True, transform=transform
    )
    rate = loader_throughput(tensor_loader, args.passes)
    results["tensor_loader_samples_per_s"] = rate
    rows.append(("TensorBatchLoader (in-memory slicing)", rate))

    res = args.resolution
    print(
        f"\n(a) shapes2d {res}x{res} uint8, {args.num_train} samples, batch {args.batch_size}, "
        f"flip+normalise; median of {args.passes} epochs after a warm-up"
    )
    width = max(len(name) for name, _ in rows)
    print(f"  {'loader'.ljust(width)}  {'samples/s':>12}")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value:12,.0f}")

    timer = data_wait(args.recipe, args.steps)
    step_ms = statistics.median(timer.steps) * 1e3
    wait_ms = statistics.median(timer.waits) * 1e3
    fraction = timer.wait_fraction()
    results.update(
        {
            f"{args.recipe}_step_ms": step_ms,
            f"{args.recipe}_data_wait_ms": wait_ms,
            f"{args.recipe}_data_wait_fraction": fraction,
        }
    )
    print(
        f"\n(b) recipe {args.recipe}: {len(timer.steps)} measured steps "
        f"(first {timer.skip} skipped)"
    )
    print(f"  median step          {step_ms:10.3f} ms")
    print(f"  median data wait     {wait_ms:10.3f} ms")
    print(f"  data wait / step     {fraction:10.2%} (sum over steps)")
    print(" ".join(f"{k}={v:.6g}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
