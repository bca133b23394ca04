"""Every algorithm's functional twin, for any PyTorch training loop.

::

    import speedup.functional as sf

    targets = sf.smooth_labels(targets, num_classes=10, alpha=0.1)
    inputs = sf.resize_batch(inputs, size=24)
    masks = sf.magnitude_masks({"fc.weight": model.fc.weight}, sparsity=0.8)

The twins do the algorithms' math on tensors and modules, with nothing of the trainer: no
events, no state, no schedule (the schedule is the caller's loop). Here is every public name
of every module of :mod:`speedup.algorithms` (its ``__all__``) except the Algorithm classes,
which are in :mod:`speedup.algorithms` itself. Each is imported from its module on first use
(a module ``__getattr__``, PEP 562), so importing this module imports no torch.

It is a facade over the algorithms, so its source sits beside them (``functional/``, installed
as ``speedup.functional``): the core under ``speedup/`` imports no algorithm.
"""

from __future__ import annotations

from typing import Any


def _twins() -> dict[str, str]:
    """Name -> the module of :mod:`speedup.algorithms` that defines it."""
    from speedup.algorithms import catalogue  # reads the modules' source, imports none of them

    return catalogue()[1]


def __getattr__(name: str) -> Any:
    if name == "__all__":  # for `from speedup.functional import *`
        return sorted(_twins())
    if name.startswith("__"):  # probes by inspect, pytest...: no need to read the sources
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from speedup.algorithms import _lazy_export  # the package's own look-up, shared

    return _lazy_export(globals(), _twins(), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_twins()})
