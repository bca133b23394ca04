"""The dataset registry: ``DATASETS.get(name)(**args) -> DataSplits``.

In its own module so that the built-in datasets register without importing the package's
``__init__`` (which imports them: a cycle) and plugins through the entry-point group
``speedup.datasets``."""

from __future__ import annotations

from speedup.registry import Registry

__all__ = ["DATASETS"]

DATASETS: Registry = Registry("dataset", group="speedup.datasets")
