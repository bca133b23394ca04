"""The baseline is tuned as hard as the methods, and it sets the target before they run.

Phase 1 tunes the recipe without algorithms for **final quality at its full budget** (its
learning rate). The best configuration is re-run on the search seeds and the target is
**pre-registered** as the median of those final qualities (AlgoPerf's target setting:
``research/search-and-records.md``, Part 2, "Targets"): it is written into the storage
before any method trial runs, and never recomputed on resume, so a short, weak baseline can
never set an easy target. Phase 2 then gives the baseline **as many trials as the methods**
over its learning rate and shorter budgets, to reach that target as fast as it can; every
speedup is measured against that fastest baseline (Schmidt et al. 2021, arXiv 2007.01547:
tuning budget decides optimizer rankings, so the budgets must be equal).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import optuna

__all__ = ["TARGET_ATTR", "pre_register_target", "registered_target", "target_from_finals"]

#: The study user attribute that holds the pre-registered target.
TARGET_ATTR = "target"


def target_from_finals(finals: Sequence[float]) -> float:
    """The target: the median over seeds of the tuned baseline's final quality."""
    if not finals:
        raise ValueError("target_from_finals: no final qualities")
    return float(statistics.median(finals))


def registered_target(study: optuna.Study) -> dict[str, Any] | None:
    """The target pre-registered in ``study`` (None: not yet)."""
    return study.user_attrs.get(TARGET_ATTR)


def pre_register_target(studies: Sequence[optuna.Study], target: dict[str, Any]) -> dict:
    """Write ``target`` into every study once; a study that already has one keeps it (and a
    different value is an error: the target must not move after trials used it)."""
    for study in studies:
        existing = registered_target(study)
        if existing is None:
            if any(True for _ in study.get_trials(deepcopy=False)):
                raise RuntimeError(
                    f"study {study.study_name!r} has trials but no pre-registered target"
                )
            study.set_user_attr(TARGET_ATTR, target)
        elif existing["value"] != target["value"]:
            raise RuntimeError(
                f"study {study.study_name!r} was tuned against target {existing['value']}, "
                f"not {target['value']}: use a new --out"
            )
    return target
