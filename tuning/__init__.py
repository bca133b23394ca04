"""``speedup tune``: find the fastest recipe for a workload with Optuna, against a baseline
tuned as hard, and prove it on fresh seeds (docs/tuning.md)."""

from speedup.tuning.tune import TuneSettings, tune

__all__ = ["TuneSettings", "tune"]
