"""The model interface, re-exported: it lives in :mod:`speedup.model` (the core)."""

from __future__ import annotations

from speedup.model import Classifier, Model, infer_kind, soft_cross_entropy

__all__ = ["Model", "Classifier", "infer_kind", "soft_cross_entropy"]
