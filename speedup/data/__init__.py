"""Dataset registry: ``DATASETS.get(name)(**args) -> DataSplits``."""

from __future__ import annotations

from speedup.data.loaders import DataInfo, DataSplits, TensorBatchLoader, build_dataloaders
from speedup.data.registry import DATASETS
from speedup.errors import DataPathError

__all__ = [
    "DATASETS",
    "DataInfo",
    "DataSplits",
    "TensorBatchLoader",
    "build_dataloaders",
    "DataPathError",
]

from speedup.data import catalog, shapes2d, text, vision  # noqa: E402,F401  (registers the built-ins)
