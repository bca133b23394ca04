"""Built-in datasets, registered by name."""

from __future__ import annotations

import os

from speedup.data.loaders import DataInfo, DataSplits
from speedup.data.registry import DATASETS
from speedup.errors import DataPathError


@DATASETS.register("mnist1d", kind="signal")
def mnist1d(
    num_train: int = 4000,
    num_test: int = 1000,
    length: int = 40,
    seed: int = 0,
    path: str | None = None,
) -> DataSplits:
    """MNIST-1D (Greydanus 2020): ten classes of 1-D signals, generated procedurally.

    With ``path`` set, reads the original ``mnist1d_data.pkl`` instead of generating.
    """
    from speedup.data.mnist1d import load_mnist1d, load_mnist1d_file

    if path is not None:
        if not os.path.exists(path):
            raise DataPathError(
                f"data.path: MNIST-1D file {path!r} does not exist; put the original "
                "mnist1d_data.pkl there, or remove data.path to generate the data procedurally"
            )
        train, test = load_mnist1d_file(path)
    else:
        train, test = load_mnist1d(num_train=num_train, num_test=num_test, length=length, seed=seed)
    shape = tuple(train["inputs"].shape[1:])
    return DataSplits(train, test, DataInfo(kind="signal", input_shape=shape, num_classes=10))
