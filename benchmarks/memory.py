"""Where a run's memory goes: resident set size after each phase of ``speedup run``.

    python -m speedup.benchmarks.memory [RECIPE] [key=value ...]

Runs in a fresh interpreter (this one) and prints, per phase, the resident set size (RSS) and
what the phase added: the interpreter, ``import torch``, speedup's own modules, loading and
validating the recipe (the first optimizer built imports ``torch._dynamo``), building the
trainer (data and model), training, and the peak over the whole run. Linux only (reads
``/proc/self/status``).
"""

from __future__ import annotations

import resource
import sys
import tempfile


def rss_mib() -> float:
    """This process's resident set size now, in MiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    recipe = args.pop(0) if args and "=" not in args[0] else "quickstart"
    phases: list[tuple[str, float]] = [("python interpreter", rss_mib())]

    import torch  # noqa: F401

    phases.append(("import torch", rss_mib()))
    from speedup.config import load_config
    from speedup.run import build_trainer, run_config

    phases.append(("import speedup (config, run)", rss_mib()))
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"run_dir={run_dir}", "progress_bar=false", "resume=never", *args]
        cfg = load_config(recipe, overrides)
        phases.append(("load and validate the recipe", rss_mib()))
        build_trainer(cfg)
        phases.append(("build a trainer (data, model, optimizer)", rss_mib()))
        summary = run_config(cfg)
        phases.append(("train, evaluate, checkpoint", rss_mib()))
    print(f"memory of `speedup run {recipe}` ({summary['steps']} steps), RSS in MiB:")
    previous = 0.0
    for name, value in phases:
        print(f"  {name:<42} {value:8.1f}  (+{value - previous:.1f})")
        previous = value
    print(f"  {'peak over the run':<42} {peak_mib():8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
