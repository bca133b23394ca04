"""How fast the command line answers: ``speedup --help`` and ``speedup list``.

Each command runs ``--repeats`` times in a fresh interpreter (as a user's shell runs it);
printed per command: the median wall-clock and the median CPU time (user + system) of the
process. On a shared machine the wall-clock grows with the load while the CPU time stays what
the command itself costs, so both are shown with the load average. ``speedup list`` is run
once before timing, so the optimizer-name cache (``~/.cache/speedup/listing``, or
``$SPEEDUP_CACHE``) is warm, as it is after the first listing.

Run: ``python -m speedup.benchmarks.startup [--repeats 7]``. The last line is
machine-readable: ``help_wall_s=<median> help_cpu_s=<median> list_wall_s=<median>
list_cpu_s=<median>``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

__all__ = ["main", "time_command"]

COMMANDS = {"help": ["--help"], "list": ["list"]}


def time_command(args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``python -m speedup ARGS`` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "speedup", *args], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    time_command(COMMANDS["list"])  # warm the optimizer-name cache and the file cache
    print(f"load average before (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = {}
    for name, command in COMMANDS.items():
        walls, cpus = zip(*(time_command(command) for _ in range(args.repeats)), strict=True)
        results[f"{name}_wall_s"] = statistics.median(walls)
        results[f"{name}_cpu_s"] = statistics.median(cpus)
        print(
            f"speedup {' '.join(command)}: median of {args.repeats}: "
            f"{results[f'{name}_wall_s']:.3f} s wall-clock, {results[f'{name}_cpu_s']:.3f} s CPU"
        )
    print(f"load average after (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(" ".join(f"{k}={v:.3f}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
