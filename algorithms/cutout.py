"""CutOut.

**What.** Fills one or more square holes at random positions of each training image with a
constant (DeVries & Taylor 2017, "Improved Regularization of Convolutional Neural Networks with
Cutout", arXiv:1708.04552). Each hole is centred on a uniformly random pixel and clipped at
the borders, as in the paper's code, so holes near an edge are partly outside the image. The
paper masks normalised images with zero, the dataset mean; ``fill`` defaults to that. Holes
are drawn per image (the paper; Composer's batch version uses one hole for the whole batch)
and applied in one vectorised mask: no loop over images.

**When it helps.** Small-image classification with conv nets where the model overfits. The
paper's Table 1 (with flips and crops): CIFAR-10 test error ResNet-18 4.72% -> 3.99% and
WRN-28-10 3.87% -> 3.08% with a 16-pixel hole (half the 32-pixel side), CIFAR-100 ResNet-18
22.46% -> 21.96% with 8 pixels; SVHN WRN-16-8 1.60% -> 1.30% with 20 pixels. Composer's
method card (``num_holes=1, length=0.5``) found little or no gain once a ResNet baseline was
well tuned or combined with other regularisers. Expected effect: small accuracy gains on
under-regularised small-image models; no speedup by itself.

**Composes badly with.** Other occlusion or mixing regularisers (CutMix, MixUp: Composer saw
no gain combining them, declared to run before them); resolution changes (a pixel ``length``
means a different fraction at another resolution: use a fraction, and CutOut runs before
ColOut and progressive resizing so holes are cut at full size).

Functional twin: :func:`cutout_batch`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from speedup.algorithms.mixup import image_augmentation

from speedup.algorithm import Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["CutOut", "cutout_batch", "hole_side"]


def hole_side(length: float, height: int, width: int) -> int:
    """Hole side in pixels: ``length`` <= 1 is a fraction of the shorter image side (rounded,
    at least 1), a larger ``length`` is a whole number of pixels."""
    if not length > 0:
        raise ValueError(f"length must be > 0, got {length}")
    if length <= 1:
        return max(1, round(length * min(height, width)))
    if length != int(length):
        raise ValueError(f"length > 1 is in pixels and must be a whole number, got {length}")
    return int(length)


def cutout_batch(
    inputs: torch.Tensor,
    num_holes: int = 1,
    length: float = 0.5,
    fill: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill ``num_holes`` square holes of side ``length`` (see :func:`hole_side`) in each image
    of ``inputs`` ``[N, C, H, W]`` with ``fill``, every channel alike. Holes may overlap and
    are clipped at the borders. Centres are drawn on the CPU from ``generator`` or torch's
    global RNG, so the result is the same on every device. Returns a new tensor."""
    if inputs.dim() != 4:
        raise ValueError(f"cutout needs images [N, C, H, W], got shape {tuple(inputs.shape)}")
    if num_holes < 1:
        raise ValueError(f"num_holes must be >= 1, got {num_holes}")
    n, _, height, width = inputs.shape
    side = hole_side(length, height, width)
    centres = torch.randint(0, height * width, (n, num_holes), generator=generator)
    corners = torch.stack([centres // width, centres % width]) - side // 2  # [2, N, holes]
    corners = corners.to(inputs.device, non_blocking=True)
    rows = torch.arange(height, device=inputs.device)
    cols = torch.arange(width, device=inputs.device)
    top, left = corners[0, ..., None], corners[1, ..., None]
    in_rows = (rows >= top) & (rows < top + side)  # [N, holes, H]
    in_cols = (cols >= left) & (cols < left + side)  # [N, holes, W]
    holes = (in_rows[..., :, None] & in_cols[..., None, :]).any(dim=1)  # [N, H, W]
    return inputs.masked_fill(holes[:, None], fill)


class CutOut(Algorithm):
    """Fill random square holes in each training image (per image, vectorised)."""

    name = "cutout"
    # DeVries & Taylor 2017 (Sec. 4): 16 px of 32 on CIFAR-10 (0.5), 8 px on CIFAR-100.
    SEARCH_SPACE = {"length": {"type": "float", "low": 0.2, "high": 0.6}}

    def __init__(self, num_holes: int = 1, length: float = 0.5, fill: float = 0.0) -> None:
        if not isinstance(num_holes, int) or isinstance(num_holes, bool) or num_holes < 1:
            raise ValueError(f"cutout.num_holes must be an integer >= 1, got {num_holes}")
        if not (isinstance(length, (int, float)) and math.isfinite(length) and length > 0):
            raise ValueError(f"cutout.length must be > 0, got {length}")
        if length > 1 and length != int(length):
            raise ValueError(
                f"cutout.length must be a fraction in (0, 1] or a whole number of pixels, "
                f"got {length}"
            )
        if not math.isfinite(fill):
            raise ValueError(f"cutout.fill must be finite, got {fill}")
        self.num_holes = num_holes
        self.length = length
        self.fill = float(fill)

    def declare(self) -> Declaration:
        return image_augmentation(self.name)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        batch = state.batch
        batch["inputs"] = cutout_batch(batch["inputs"], self.num_holes, self.length, self.fill)
