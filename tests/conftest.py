"""Shared fixtures: tiny in-memory data and models that train in milliseconds."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from speedup.data import TensorBatchLoader
from speedup.models import Classifier

# Generated datasets are cached on disk; keep the tests' cache out of the user's home.
os.environ.setdefault("SPEEDUP_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))


def make_blobs(n: int = 128, features: int = 8, classes: int = 4, seed: int = 0) -> dict:
    """Linearly separable-ish Gaussian blobs."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g) * 3
    targets = torch.arange(n) % classes
    inputs = centers[targets] + torch.randn(n, features, generator=g)
    return {"inputs": inputs, "targets": targets}


@pytest.fixture
def blobs() -> dict:
    return make_blobs()


def tiny_model(features: int = 8, classes: int = 4, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))
    return Classifier(net, classes, kind="mlp")


def loaders(data: dict, batch_size: int = 16, seed: int = 0):
    train = TensorBatchLoader(data, batch_size, shuffle=True, drop_last=True, seed=seed)
    evaluation = TensorBatchLoader(data, 32)
    return train, evaluation
