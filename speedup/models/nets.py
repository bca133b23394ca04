"""Small plain ``nn.Module`` networks for quick experiments and tests.

All models take a single tensor and return logits; parameter initialisation uses
PyTorch's defaults, so it is deterministic given ``torch.manual_seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Conv1dNet", "MLP", "SmallCNN2d"]


class Conv1dNet(nn.Module):
    """Small 1-D CNN for MNIST-1D: three stride-2 convolutions with ReLU and a linear head.

    Input ``[N, in_channels, length]`` (a ``[N, length]`` input is treated as one
    channel), output logits ``[N, num_classes]``. Convolutions pad circularly by
    default, matching the circular shifts of MNIST-1D (several points more accurate than
    zero padding there); pass ``padding_mode="zeros"`` for non-periodic signals.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: int = 32,
        length: int = 40,
        kernel_size: int = 5,
        padding_mode: str = "circular",
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        layers: list[nn.Module] = []
        c_in = in_channels
        out_len = length
        for _ in range(3):
            conv = nn.Conv1d(
                c_in, channels, kernel_size, stride=2, padding=pad, padding_mode=padding_mode
            )
            layers += [conv, nn.ReLU()]
            c_in = channels
            out_len = (out_len + 2 * pad - kernel_size) // 2 + 1
        self.in_channels = in_channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and self.in_channels == 1:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


class MLP(nn.Module):
    """Multi-layer perceptron over the flattened input.

    ``widths`` are the hidden layer sizes; ``MLP(784, 10, (300, 100))`` is LeNet-300-100
    and ``widths=()`` gives multinomial logistic regression.
    """

    def __init__(
        self, in_features: int, num_classes: int, widths: Sequence[int] = (300, 100)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for w in widths:
            layers += [nn.Linear(prev, w), nn.ReLU()]
            prev = w
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN2d(nn.Module):
    """Small 2-D CNN for 32x32 images (e.g. CIFAR-10).

    Four 3x3 conv + BatchNorm + ReLU blocks (``channels``, ``channels``, ``2*channels``,
    ``2*channels``) with 2x2 max-pooling after the second and fourth, then global
    average pooling and a linear classifier. Works for any input size >= 4x4.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, channels: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        c1, c2 = channels, 2 * channels
        self.features = nn.Sequential(
            *block(in_channels, c1),
            *block(c1, c1),
            nn.MaxPool2d(2),
            *block(c1, c2),
            *block(c2, c2),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))
