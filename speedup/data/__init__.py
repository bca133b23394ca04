"""Dataset registry: ``DATASETS.get(name)(**args) -> DataSplits``."""

from __future__ import annotations

from speedup.data.loaders import DataInfo, DataSplits, TensorBatchLoader, build_dataloaders
from speedup.registry import Registry

__all__ = [
    "DATASETS",
    "DataInfo",
    "DataSplits",
    "TensorBatchLoader",
    "build_dataloaders",
    "DataPathError",
]

DATASETS: Registry = Registry("dataset", group="speedup.datasets")


class DataPathError(FileNotFoundError):
    """A configured data path does not exist. The message says what to put where."""


from speedup.data import catalog, shapes2d, text, vision  # noqa: E402,F401  (registers the built-ins)
