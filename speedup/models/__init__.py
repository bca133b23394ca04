"""Model registry: ``MODELS.get(name)(data_info, **args) -> Model``."""

from __future__ import annotations

from speedup.model import Classifier, Model
from speedup.models.registry import MODELS, build_model

__all__ = ["MODELS", "Model", "Classifier", "build_model"]

from speedup.models import language, vision, zoo  # noqa: E402,F401  (registers the built-in models)
