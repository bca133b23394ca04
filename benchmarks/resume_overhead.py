"""How long a resumed run takes to reach its first training step, against a fresh start.

Each measurement is a new Python process running ``speedup.run.run_config`` (what
``speedup run`` calls), timed from just before the process is launched to the end of its first
training step: interpreter start, imports, data (from the cache), model, and for the resumed
run reading, verifying (SHA-256) and restoring the checkpoint. The checkpoint sits mid-epoch,
so the resumed run must also position its data order there; ours skips straight to the batch
without loading the skipped ones. Fresh and resumed launches alternate so that machine noise
hits both alike; medians are reported.

Run: ``python -m speedup.benchmarks.resume_overhead [--repeats N]``. The last line is
machine-readable: ``resume_ratio=<float> fresh_s=<float> resumed_s=<float>
checkpoint_mb=<float>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from speedup.callback import Callback

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

#: ResNet-20 on Shapes-2D with EMA, pruning (masks), weight rewinding (a snapshot) and
#: progressive resizing: a checkpoint with every kind of state in it.
RECIPE = "shapes2d-baseline"
OVERRIDES = [
    "threads=1",
    "progress_bar=false",
    "log_interval=0ba",
    "eval_interval=0ba",
    "algorithms.ema.half_life=10ba",
    "algorithms.magnitude_pruning.sparsity=0.8",
    "algorithms.magnitude_pruning.at=100ba",
    "algorithms.rewinding.mode=weights",
    "algorithms.rewinding.to=20ba",
    "algorithms.progressive_resizing.initial_scale=0.5",
]
CHECKPOINT_AT = 120  # 78 batches per epoch: batch 42 of epoch 1


class FirstStep(Callback):
    """Prints the wall-clock time of the first training step's end, then ends the process."""

    def batch_end(self, state: State, logger: Logger) -> None:
        print(json.dumps({"first_step_at": time.time(), "step": state.timestamp.batch}))
        sys.stdout.flush()
        os._exit(0)


class CrashAfter(Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_end(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch > self.batch:
            raise SystemExit(0)


def _config(run_dir: Path, *extra: str):
    from speedup.config import load_config

    return load_config(RECIPE, [*OVERRIDES, f"run_dir={run_dir}", *extra])


def child(run_dir: str, resume: str) -> None:
    from speedup.run import run_config

    run_config(_config(Path(run_dir), f"resume={resume}"), extra_callbacks=[FirstStep()])


def prepare(run_dir: Path) -> Path:
    """Train to CHECKPOINT_AT, saving a checkpoint there, and stop."""
    from speedup.checkpoint import find_latest
    from speedup.run import run_config

    cfg = _config(run_dir, f"checkpoint.interval={CHECKPOINT_AT}ba")
    try:
        run_config(cfg, extra_callbacks=[CrashAfter(CHECKPOINT_AT)])
    except SystemExit:
        pass
    found = find_latest(run_dir / "checkpoints")
    assert found is not None and found.name.endswith(f"ba{CHECKPOINT_AT}"), found
    return found


def launch(run_dir: Path, resume: str) -> tuple[float, int]:
    code = (
        "import sys; from speedup.benchmarks.resume_overhead import child; "
        "child(sys.argv[1], sys.argv[2])"
    )
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-c", code, str(run_dir), resume],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    record = json.loads(out.strip().splitlines()[-1])
    return record["first_step_at"] - started, record["step"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        resumed_dir = Path(tmp) / "resumed"
        print(f"training {RECIPE} to step {CHECKPOINT_AT} to make a mid-epoch checkpoint ...")
        checkpoint = prepare(resumed_dir)
        size_mb = sum(f.stat().st_size for f in checkpoint.iterdir()) / 1e6
        fresh, resumed = [], []
        for _ in range(args.repeats):
            seconds, step = launch(Path(tmp) / "fresh", "never")
            assert step == 1
            fresh.append(seconds)
            seconds, step = launch(resumed_dir, "auto")
            assert step == CHECKPOINT_AT + 1
            resumed.append(seconds)
    f, r = statistics.median(fresh), statistics.median(resumed)
    print(f"checkpoint: {checkpoint.name}, {size_mb:.1f} MB")
    print(f"fresh start to first step:   {f:.2f} s (runs: {', '.join(f'{x:.2f}' for x in fresh)})")
    print(
        f"resumed start to first step: {r:.2f} s (runs: {', '.join(f'{x:.2f}' for x in resumed)})"
    )
    print(f"resume_ratio={r / f:.4f} fresh_s={f:.4f} resumed_s={r:.4f} checkpoint_mb={size_mb:.2f}")


if __name__ == "__main__":
    main()
