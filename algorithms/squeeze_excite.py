"""Squeeze-and-Excitation blocks after wide convolutions.

**What.** Hu et al. (2018, "Squeeze-and-excitation networks", CVPR; section 3) reweight the
channels of a feature map ``U`` ``[N, C, H, W]`` by a gate computed from ``U`` itself:
squeeze ``z = mean_{h,w} U`` (global average pooling, ``[N, C]``), excite
``s = sigmoid(W_2 relu(W_1 z))`` (their Eq. 3, no bias terms) with ``W_1`` ``[L, C]`` and
``W_2`` ``[C, L]``, output ``U * s`` per channel. ``latent_channels`` is ``L`` when >= 1, or
a fraction of ``C`` when < 1 (``0.0625`` is the paper's reduction ratio r = 16). Each block
adds ``2 C L`` parameters.

**Placement.** This follows Composer's reference surgery (``apply_squeeze_excite`` in
composer/algorithms/squeeze_excite/squeeze_excite.py): one block directly after every
``nn.Conv2d`` with ``min(in_channels, out_channels) >= min_channels`` (``conv -> SE``, so
before the conv's normalisation layer), with bias-free ``Linear`` layers. On torchvision's
ResNet-50 at the default ``min_channels=128`` that is 42 of its 53 convolutions (gating on
the output channels alone would give 46). Hu et al. instead put one block per residual
block, on the branch after its last BatchNorm and before the identity is added (16 blocks
on ResNet-50, their Figure 3). We keep the reference's rule because it needs no knowledge
of a network's block structure (it applies to any conv net, residual or not), and the
``min_channels`` threshold lets it spend the gates only where feature maps are small;
the price is more gates than the paper's and a different position inside the block.

**When it helps.** Conv nets where accuracy per unit of training time matters more than
inference latency. Hu et al. (Table 2): ImageNet ResNet-50 top-1 error 24.80% -> 23.29%
(their re-implementation) for 3.86 -> 3.87 GFLOPs (+0.26%) and ~2.5M (~10%) more parameters,
with their placement. Composer's method card (composer/algorithms/squeeze_excite/README.md)
reports a better accuracy/time trade-off on its ResNet benchmarks despite slower steps,
about +20% inference latency, and recommends ``min_channels=512`` at ImageNet scale (only
the small, late feature maps get blocks, where they are cheap) with at least 64 latent
channels; the defaults here (``latent_channels=64``, ``min_channels=128``) are Composer's.

**Composes badly with.** Inference-latency budgets (it adds work at eval). Nothing in the
training catalogue conflicts; the gates are ``nn.Linear`` layers, so weight standardization
(convolutions only) leaves them alone, and blurpool runs first so a blurred strided
convolution is what gets gated (declared order).

Functional twin: :func:`apply_squeeze_excite` (modules :class:`SqueezeExcite2d`,
:class:`SqueezeExciteConv2d`).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from speedup.algorithms._init_order import init_surgery
from torch import nn

from speedup.algorithm import Algorithm, Declaration
from speedup.event import Event
from speedup.surgery import replace_modules

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "SqueezeExcite",
    "SqueezeExcite2d",
    "SqueezeExciteConv2d",
    "apply_squeeze_excite",
    "latent_width",
]


def latent_width(channels: int, latent_channels: float) -> int:
    """The gate's hidden width for a ``channels``-wide map: ``latent_channels`` itself when
    >= 1, else that fraction of ``channels`` (at least 1)."""
    if latent_channels >= 1:
        return int(latent_channels)
    return max(1, math.floor(channels * latent_channels))


class SqueezeExcite2d(nn.Module):
    """Channel gate ``x * sigmoid(W_2 relu(W_1 mean_hw(x)))`` (Hu et al. 2018, Figure 1)."""

    def __init__(self, channels: int, latent_channels: int) -> None:
        super().__init__()
        # No biases: Hu et al.'s Eq. 3 has none, nor has the reference's MLP.
        self.reduce = nn.Linear(channels, latent_channels, bias=False)
        self.expand = nn.Linear(latent_channels, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=(-2, -1))  # [N, C]
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(squeezed))))
        return x * gate[:, :, None, None]


class SqueezeExciteConv2d(nn.Module):
    """A convolution followed by its squeeze-and-excitation gate."""

    def __init__(self, conv: nn.Conv2d, latent_channels: int) -> None:
        super().__init__()
        self.conv = conv
        self.se = SqueezeExcite2d(conv.out_channels, latent_channels)
        weight = conv.weight
        self.se.to(device=weight.device, dtype=weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.conv(x))


def _check(latent_channels: float, min_channels: int, prefix: str = "") -> None:
    whole = latent_channels >= 1 and latent_channels == int(latent_channels)
    if not (whole or 0 < latent_channels < 1):
        raise ValueError(
            f"{prefix}latent_channels must be a whole number of channels >= 1 or a fraction in "
            f"(0, 1), got {latent_channels}"
        )
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"{prefix}min_channels must be an integer >= 1, got {min_channels}")


def apply_squeeze_excite(
    model: nn.Module, latent_channels: float = 64, min_channels: int = 128
) -> int:
    """Put a :class:`SqueezeExcite2d` after every ``nn.Conv2d`` with at least ``min_channels``
    input and output channels (``min(in, out) >= min_channels``), in place; returns how many
    were added.

    New parameters are created here: build the optimizer afterwards (the Trainer does, since
    this runs at INIT). A convolution already gated is not gated twice.
    """
    _check(latent_channels, min_channels)

    def build(child: nn.Module) -> nn.Module | None:
        if (
            isinstance(child, nn.Conv2d)
            and min(child.in_channels, child.out_channels) >= min_channels
        ):
            return SqueezeExciteConv2d(child, latent_width(child.out_channels, latent_channels))
        return None

    # The conv inside an existing SqueezeExciteConv2d is already gated: skip it.
    return len(replace_modules(model, build, skip_children_of=SqueezeExciteConv2d))


class SqueezeExcite(Algorithm):
    """Add squeeze-and-excitation channel gates after wide convolutions (Hu et al. 2018)."""

    name = "squeeze_excite"

    def __init__(self, latent_channels: float = 64, min_channels: int = 128) -> None:
        _check(latent_channels, min_channels, "squeeze_excite.")
        self.latent_channels = latent_channels
        self.min_channels = min_channels
        #: How many gates the last surgery added.
        self.added = 0

    def declare(self) -> Declaration:
        return init_surgery("squeeze_excite", model_kinds={"cnn"}, data_kinds={"image"})

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.added = apply_squeeze_excite(state.model, self.latent_channels, self.min_channels)
        if not self.added:
            warnings.warn(
                f"squeeze_excite found no Conv2d with >= {self.min_channels} input and output "
                "channels: it has no effect (lower min_channels for a narrow network)",
                stacklevel=2,
            )
