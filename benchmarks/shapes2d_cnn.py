"""How long the reference SmallCNN takes to learn Shapes-2D, against its time bound.

The test suite checks what this training reaches (``tests/test_shapes2d.py``: at least 78%
test accuracy, not saturated) and never how long it takes, since wall-clock on a shared
machine says more about the load than about the code. The time lives here: the same
training, :func:`train_and_test` (AdamW, 5% linear warmup then cosine, flip augmentation),
of ``SmallCNN2d`` with 16 channels for 15 epochs on the default 10,000 training images,
measured at 83.2% test accuracy in 37 s of training on 2 CPU cores (torch 2.15, 2 threads).

Prints the machine and load, the data build's seconds (generation or cache read, not
training), the training seconds, the CPU seconds of the process and the test accuracy,
then whether training stayed within ``--bound-s`` (default 360 s, the bound the test suite
used to assert). Exit status 1 when it did not, so a CI job on a quiet machine can keep
the bound.

Run: ``python -m speedup.benchmarks.shapes2d_cnn [--epochs 15] [--channels 16]
[--num-train 10000] [--num-test 2000] [--threads N] [--bound-s 360]``. The last line is
machine-readable: ``shapes2d_cnn_train_s=<float> shapes2d_cnn_cpu_s=<float>
shapes2d_cnn_accuracy=<float> bound_s=<float> within_bound=<0|1>``.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["main", "train_and_test"]


def train_and_test(
    net: nn.Module, splits: Any, epochs: int, lr: float, batch_size: int = 128
) -> float:
    """Train ``net`` on ``splits.train`` and return its test accuracy.

    AdamW (weight decay 5e-4), a linear warmup over the first 5% of steps then cosine decay,
    the splits' train transform (random horizontal flip) on every batch; evaluation in
    batches of 500 with the eval transform. Seed torch before calling for a repeatable run.
    """
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    n = len(splits.train["targets"])
    steps = epochs * (n // batch_size)

    def factor(i: int) -> float:
        warmup = min(1.0, (i + 1) / (0.05 * steps))
        return warmup * 0.5 * (1 + math.cos(math.pi * min(i / steps, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(n)
        for i in range(n // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            batch = splits.train_transform({k: v[idx] for k, v in splits.train.items()})
            loss = F.cross_entropy(net(batch["inputs"]), batch["targets"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    test = splits.eval_transform(splits.eval)
    with torch.no_grad():
        predictions = torch.cat([net(x).argmax(1) for x in test["inputs"].split(500)])
    return (predictions == test["targets"]).float().mean().item()


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> dict[str, float]:
    from speedup.benchmarks.quickstart_time import machine

    from speedup.data.shapes2d import shapes2d
    from speedup.models.nets import SmallCNN2d

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-train", type=int, default=10000)
    parser.add_argument("--num-test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--bound-s", type=float, default=360.0)
    parser.add_argument("--cache", help="dataset cache folder (default: a fresh temp dir)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # A private cache unless told otherwise: the data build is timed on its own, and the
    # user's cache is left as it was.
    os.environ["SPEEDUP_CACHE"] = args.cache or tempfile.mkdtemp(prefix="shapes2d-cnn-")
    info = machine()
    print(
        f"machine: {info['cpu']}; {info['cores_usable']} usable of {info['cores_total']} cores; "
        f"python {info['python']}; torch {info['torch']} at {torch.get_num_threads()} threads"
    )
    print(f"load average before (1, 5, 15 min): {_load()}")
    started = time.perf_counter()
    splits = shapes2d(num_train=args.num_train, num_test=args.num_test)
    data_s = time.perf_counter() - started
    torch.manual_seed(args.seed)
    net = SmallCNN2d(3, 10, channels=args.channels)
    cpu = _cpu_seconds()
    started = time.perf_counter()
    accuracy = train_and_test(net, splits, epochs=args.epochs, lr=args.lr)
    train_s = time.perf_counter() - started
    cpu_s = _cpu_seconds() - cpu
    print(f"load average after (1, 5, 15 min): {_load()}")
    within = train_s <= args.bound_s
    print(
        f"SmallCNN2d({args.channels} channels), {args.epochs} epochs of {args.num_train} images: "
        f"data {data_s:.1f} s, training {train_s:.1f} s wall-clock ({cpu_s:.1f} s CPU), "
        f"test accuracy {accuracy:.4f}; bound {args.bound_s:.0f} s: "
        f"{'within' if within else 'EXCEEDED'}"
    )
    results = {
        "shapes2d_cnn_train_s": train_s,
        "shapes2d_cnn_cpu_s": cpu_s,
        "shapes2d_cnn_accuracy": accuracy,
        "bound_s": args.bound_s,
        "within_bound": float(within),
    }
    print(" ".join(f"{k}={v:.4g}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["within_bound"] else 1)
