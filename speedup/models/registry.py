"""The model registry: ``MODELS.get(name)(data_info, **args) -> Model``.

In its own module so that the built-in models register without importing the package's
``__init__`` (which imports them: a cycle) and plugins through the entry-point group
``speedup.models``."""

from __future__ import annotations

from typing import Any

from speedup.model import Model
from speedup.registry import Registry

__all__ = ["MODELS", "build_model"]

MODELS: Registry = Registry("model", group="speedup.models")


def build_model(name: str, info: Any, **args: Any) -> Model:
    """Build a registered model for the data described by ``info`` (a ``DataInfo``)."""
    return MODELS.get(name)(info, **args)
