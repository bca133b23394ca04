"""speedup: composable training speedups for PyTorch.

The public API is imported lazily so that ``import speedup`` (and ``speedup --help``) is fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Event": "speedup.event",
    "Time": "speedup.time",
    "TimeUnit": "speedup.time",
    "Timestamp": "speedup.time",
    "TimeConverter": "speedup.time",
    "State": "speedup.state",
    "Algorithm": "speedup.algorithm",
    "Access": "speedup.algorithm",
    "Declaration": "speedup.algorithm",
    "ALGORITHMS": "speedup.algorithm",
    "Callback": "speedup.callback",
    "CALLBACKS": "speedup.callback",
    "Engine": "speedup.engine",
    "Plan": "speedup.engine",
    "PlanError": "speedup.errors",
    "build_plan": "speedup.engine",
    "Trainer": "speedup.trainer",
    "seed_everything": "speedup.trainer",
    "Model": "speedup.model",
    "Classifier": "speedup.model",
    "Logger": "speedup.logger",
    "load_config": "speedup.config",
    "load_recipe": "speedup.config",
    "ConfigError": "speedup.errors",
    "run_recipe": "speedup.run",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'speedup' has no attribute {name!r}")
