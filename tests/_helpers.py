"""Helpers that several test modules share: the command line in and out of process, a pip
install only some subprocesses see, a gradient tap, and synthetic benchmark sweeps.

Imported as ``from _helpers import ...``: the tests folder is on ``sys.path`` (pytest puts it
there for ``conftest.py``), as for ``from conftest import ...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from speedup.callback import Callback
from speedup.cli import main

# -- the command line ---------------------------------------------------------------------------


def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """``speedup ARGV`` in this process: its exit code, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(code: int, err: str) -> str:
    """Bad input's one way out: exit 2, no traceback, exactly one ``error:`` line (returned)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def speedup_process(*args: str, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    """``python -m speedup ARGS`` in a fresh process, its text output captured; ``kwargs`` go
    to :func:`subprocess.run` (``cwd``, ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "speedup", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def speedup_output(*args: str, **kwargs: Any) -> str:
    """The stdout of ``python -m speedup ARGS``, which must succeed."""
    done = speedup_process(*args, **kwargs)
    assert done.returncode == 0, f"speedup {' '.join(args)}: {done.stderr}"
    return done.stdout


def environment_with_path(folder: Path) -> dict[str, str]:
    """This process's environment with ``folder`` first on ``PYTHONPATH``: what a subprocess
    needs to import from it while this process (and every other test) does not."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    return env


def pip_install_into(source: Path, site: Path) -> dict[str, str]:
    """Install the project at ``source`` into the folder ``site`` with pip, offline (no
    dependencies, no build isolation, no index); returns the environment that sees it."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", "--quiet", "--target", str(site), str(source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return environment_with_path(site)


# -- training ----------------------------------------------------------------------------------


class GradTap(Callback):
    """Copies the gradients as the optimizer will see them."""

    def __init__(self) -> None:
        self.grads: list = []

    def after_train_batch(self, state: Any, logger: Any) -> None:
        self.grads.append([p.grad.clone() for p in state.model.parameters()])


# -- synthetic benchmark sweeps ----------------------------------------------------------------

#: The target every synthetic curve rises through (at its crossing step).
SWEEP_TARGET = {"metric": "accuracy", "value": 0.5, "higher_is_better": True}


def rising_curve(
    cross_step: int | None,
    *,
    last: int,
    samples_per_step: int,
    seconds_per_step: float,
    flops_per_step: float | None = None,
) -> list[dict]:
    """Evaluations every 10 steps up to ``last`` of a metric rising linearly through the
    target 0.5 at ``cross_step`` (never reaching it when ``cross_step`` is None: it tops out
    at 0.4); ``flops`` is null without ``flops_per_step``."""
    target = SWEEP_TARGET["value"]
    return [
        {
            "step": step,
            "epoch": step // 10,
            "sample": samples_per_step * step,
            "train_time_s": seconds_per_step * step,
            "flops": None if flops_per_step is None else flops_per_step * step,
            "value": min(
                1.0, 0.4 * step / last if cross_step is None else target * step / cross_step
            ),
        }
        for step in range(10, last + 1, 10)
    ]


def sweep_results(
    crossings: dict[str, list[int | None]],
    finals: dict[str, float],
    step_cost: dict[str, float],
    *,
    baseline_step_time_s: float,
    last: int,
    samples_per_step: int,
    seconds_per_step: float,
    flops_per_step: float | None = None,
    seeds: tuple[int, ...] = (1, 2),
    conflicts: dict[str, str] | None = None,
    suite: str = "synthetic",
    workload: dict | None = None,
    environment: dict | None = None,
) -> dict:
    """A results.json payload as a sweep of the shapes2d baseline writes it: a run per
    configuration and seed, whose curve (:func:`rising_curve`, ``last`` steps) crosses the
    target at ``crossings[config]`` (a step per seed) and ends at accuracy ``finals[config]``.
    The analysis reads the timing (``step_cost``, ``baseline_step_time_s``) and ``conflicts``;
    ``suite``, ``workload`` and ``environment`` are shown in the report only."""
    runs = [
        {
            "config": config,
            "algorithms": [] if config == "baseline" else config.split("+"),
            "seed": seed,
            "config_hash": f"{config}-{seed}",
            "run_dir": f"runs/{config}-{seed}",
            "cached": False,
            "curve": rising_curve(
                cross,
                last=last,
                samples_per_step=samples_per_step,
                seconds_per_step=seconds_per_step,
                flops_per_step=flops_per_step,
            ),
            "final": {"accuracy": finals[config], "loss": 1 - finals[config]},
            "steps": last,
            "train_time_s": seconds_per_step * last,
            "eval_time_s": 1.0,
        }
        for config, per_seed in crossings.items()
        for seed, cross in zip(seeds, per_seed, strict=True)
    ]
    return {
        "suite": suite,
        "workload": workload
        or {"recipe": "shapes2d-baseline", "overrides": [f"max_duration={last}ba"]},
        "target": dict(SWEEP_TARGET),
        "seeds": list(seeds),
        "environment": environment or {},
        "baseline_step_time_s": baseline_step_time_s,
        "step_cost": step_cost,
        "conflicts": conflicts or {},
        "runs": runs,
    }
