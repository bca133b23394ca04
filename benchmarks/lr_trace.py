"""The learning rate each run actually trained with, read back from its ``metrics.jsonl``.

For every run directory under the given paths (a run, a lottery experiment, a sweep), prints
the LR at the first and last logged steps, the step where a pruning rewound the schedule (if
any), and, for comparison, the LR the run's own schedule has at its end, computed by the
project's schedule from the run's ``config.yaml``. The trainer logs ``lr`` after each
``log_interval`` step, so the value logged at step s is the LR set for step s + 1; the last
one, at the final step, is the schedule's end value. Used to check that LR rewinding ends where
the schedule ends (docs/algorithms.md, "Which schedule is replayed"; docs/lottery.md).

Run: ``python -m speedup.benchmarks.lr_trace RUN_OR_EXPERIMENT_DIR [...]``. One line per run:
``run=<dir> steps=<first>..<last> lr_first=<f> lr_last=<f> schedule_end=<f> peak=<f>
[rewound_at=<step> rewound_to=<step> [lr_at_rewind=<f>]]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from speedup.config import with_changes
from speedup.run import build_trainer

__all__ = ["lr_trace", "schedule_end_lr"]


def lr_trace(metrics: Path) -> tuple[dict[int, float], dict[str, int]]:
    """``{step: lr}`` as logged, and the rewinding event (``at_batch``/``to_batch``) if any."""
    lrs, rewound = {}, {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "lr" in record:
            lrs[int(record["step"])] = float(record["lr"])
        if "rewinding/at_batch" in record:
            rewound = {
                "at": int(record["rewinding/at_batch"]),
                "to": int(record["rewinding/to_batch"]),
            }
    return lrs, rewound


def schedule_end_lr(config: Path) -> tuple[float, float]:
    """(the first param group's base LR, its LR at the end of the run's schedule)."""
    # the schedule alone: building the trainer trains nothing, and no algorithm changes the end
    cfg = with_changes(OmegaConf.load(config), progress_bar=False, algorithms={})
    state = build_trainer(cfg).state
    if not state.schedulers:
        base = float(state.optimizer.param_groups[0]["lr"])
        return base, base
    scheduler = state.schedulers[0]
    schedule = scheduler.lr_lambdas[0]
    base = float(scheduler.base_lrs[0])
    return base, base * schedule.factor_at(schedule.total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for root in args.paths:
        for metrics in sorted(root.rglob("metrics.jsonl")):
            run = metrics.parent
            lrs, rewound = lr_trace(metrics)
            if not lrs:
                print(f"run={run} no lr logged")
                continue
            first, last = min(lrs), max(lrs)
            peak, end = schedule_end_lr(run / "config.yaml")
            line = (
                f"run={run} steps={first}..{last} lr_first={lrs[first]:.6g} "
                f"lr_last={lrs[last]:.6g} schedule_end={end:.6g} peak={peak:.6g}"
            )
            if rewound:
                line += f" rewound_at={rewound['at']} rewound_to={rewound['to']}"
                if rewound["at"] in lrs:  # logged after the pruning step: the retrain's first LR
                    line += f" lr_at_rewind={lrs[rewound['at']]:.6g}"
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
