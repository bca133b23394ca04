"""Built-in models, registered by name. Each builder takes the data's DataInfo first."""

from __future__ import annotations

import math

from speedup.model import Classifier
from speedup.models.nets import MLP, Conv1dNet, SmallCNN2d
from speedup.models.registry import MODELS


@MODELS.register("mnist1d_cnn", kind="cnn")
def mnist1d_cnn(info, channels: int = 32) -> Classifier:
    """A three-layer 1-D CNN for signals such as MNIST-1D."""
    in_channels, length = info.input_shape
    net = Conv1dNet(in_channels, info.num_classes, channels=channels, length=length)
    return Classifier(net, info.num_classes, kind="cnn")


@MODELS.register("mlp", kind="mlp")
def mlp(info, widths: list[int] = (300, 100)) -> Classifier:  # noqa: B006 - tuple default
    """A fully connected net over the flattened input; widths [300, 100] is LeNet-300-100."""
    net = MLP(math.prod(info.input_shape), info.num_classes, widths=tuple(widths))
    return Classifier(net, info.num_classes, kind="mlp")


@MODELS.register("small_cnn", kind="cnn")
def small_cnn(info, channels: int = 32) -> Classifier:
    """A four-layer 2-D CNN with BatchNorm for small images."""
    net = SmallCNN2d(info.input_shape[0], info.num_classes, channels=channels)
    return Classifier(net, info.num_classes, kind="cnn")
