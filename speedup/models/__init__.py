"""Model registry: ``MODELS.get(name)(data_info, **args) -> Model``."""

from __future__ import annotations

from speedup.models.base import Classifier, Model
from speedup.registry import Registry

__all__ = ["MODELS", "Model", "Classifier", "build_model"]

MODELS: Registry = Registry("model", group="speedup.models")


def build_model(name: str, info, **args) -> Model:  # noqa: ANN001 - DataInfo, avoids a cycle
    """Build a registered model for the data described by ``info``."""
    return MODELS.get(name)(info, **args)


from speedup.models import language, vision, zoo  # noqa: E402,F401  (registers the built-in models)
