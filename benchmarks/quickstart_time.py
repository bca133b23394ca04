"""How long ``speedup run quickstart`` takes, and on what: the figure the README quotes.

Runs the README's command as a user would (a fresh ``speedup`` process, recipe defaults) once
per ``--repeats``, each into a fresh run directory, and prints per run: the command's wall-clock
from start to exit (interpreter start, data generation, training, evaluations, checkpoints),
the training time the run itself reports (evaluation excluded), the evaluation time, the CPU
time the process used, and the final test accuracy. Before the runs it prints the machine: CPU
model, the cores this process may use, torch's thread count, and the load average before and
after (on a shared machine the wall-clock grows with the load; the CPU time much less).

Run: ``python -m speedup.benchmarks.quickstart_time [--repeats 1] [--cores 0,1]
[--out DIR] [key=value ...]``. ``--cores`` pins the runs to those CPUs (Linux), so a
bigger machine measures "2 CPU cores" honestly. The last line is machine-readable:
``quickstart_wall_s=<median> quickstart_train_s=<median> quickstart_cpu_s=<median>
quickstart_accuracy=<median>``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["machine", "main", "time_quickstart"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """What the figure was measured on."""
    import torch

    return {
        "cpu": _cpu_model(),
        "cores_usable": _usable_cores(),
        "cores_total": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def time_quickstart(
    run_dir: Path, overrides: list[str], cores: list[int] | None = None
) -> dict[str, Any]:
    """One ``speedup run quickstart`` in a fresh process; its timings and final accuracy."""
    command = [sys.executable, "-m", "speedup", "run", "quickstart"]
    command += [*overrides, f"run_dir={run_dir}", "progress_bar=false"]
    preexec = None
    if cores is not None and hasattr(os, "sched_setaffinity"):
        preexec = lambda: os.sched_setaffinity(0, cores)  # noqa: E731 - runs in the child
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=preexec)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    summary = json.loads((run_dir / "summary.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": wall,
        "train_s": summary["train_time_s"],
        "eval_s": summary["eval_time_s"],
        "cpu_s": cpu,
        "steps": summary["steps"],
        "accuracy": summary["metrics"]["accuracy"],
        "torch_threads": summary.get("environment", {}).get("torch_threads"),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cores", help="comma-separated CPU ids to pin the runs to (Linux)")
    parser.add_argument("--out", help="where the run directories go (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the recipe")
    args = parser.parse_args(argv)
    cores = [int(c) for c in args.cores.split(",")] if args.cores else None
    info = machine()
    if cores is not None:
        info["cores_usable"] = len(cores)
    print(
        f"machine: {info['cpu']}; {info['cores_usable']} usable of {info['cores_total']} cores; "
        f"{info['platform']}; python {info['python']}; torch {info['torch']}"
    )
    print(f"load average before (1, 5, 15 min): {_load()}")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="quickstart-time-"))
    rows = []
    for repeat in range(args.repeats):
        run_dir = out / f"run{repeat}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resumed one
        row = time_quickstart(run_dir, args.overrides, cores)
        rows.append(row)
        print(
            f"run {repeat}: command {row['wall_s']:.1f} s wall-clock, training "
            f"{row['train_s']:.1f} s (eval excluded), eval {row['eval_s']:.1f} s, "
            f"CPU {row['cpu_s']:.1f} s, "
            f"{row['steps']} steps at {row['torch_threads']} torch threads, "
            f"accuracy {row['accuracy']:.4f}"
        )
    print(f"load average after (1, 5, 15 min): {_load()}")
    results = {
        f"quickstart_{key}": statistics.median(r[key] for r in rows)
        for key in ("wall_s", "train_s", "cpu_s", "accuracy")
    }
    print(" ".join(f"{k}={v:.4g}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
