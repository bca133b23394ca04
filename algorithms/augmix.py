"""AugMix (augment-and-mix, without the Jensen-Shannon loss).

**What.** For each image, ``width`` augmentation chains of 1-3 random operations each
(``depth = -1``; a fixed depth otherwise), mixed with weights ``w ~ Dirichlet(alpha, ...,
alpha)``, then blended with the original image by ``m ~ Beta(alpha, alpha)``:
``x_augmix = m * x + (1 - m) * sum_i w_i * chain_i(x)`` (Hendrycks et al. 2020, "AugMix: A
Simple Data Processing Method to Improve Robustness and Uncertainty", ICLR, Algorithm 1).
Each operation's level is drawn uniformly in [0.1, ``severity``] on the 0-10 scale, as in the
paper's code. The operations are RandAugment's batched tensor operations
(:mod:`speedup.algorithms.randaugment`, which documents how they act on normalised tensors);
the default ``safe`` set is the paper's, which leaves out the operations the CIFAR-10-C and
ImageNet-C corruptions are made of. All ``width`` chains of the batch run as one stacked
batch, so each operation runs once per layer on every image that drew it.

The paper's Jensen-Shannon consistency loss between the clean image and two AugMix views is
omitted: it triples the forward passes per step (Composer omits it too; the paper calls the
augmentation alone "AugmentAndMix").

**When it helps.** Robustness to corruptions and calibration, more than clean accuracy.
Hendrycks et al. report large drops of the corruption error (CIFAR-10-C, ImageNet-C), with
the JSD loss; Composer's method card quotes their +13.8% accuracy on CIFAR-10-C for a
WRN-40-2 and +1.5% ImageNet top-1 for ResNet-50 (with JSD), and measured about +0.5%
ImageNet top-1 for ResNet-50 with the augmentation alone, at a large CPU cost in its PIL
version (1.1x-10x training time), which running batched on the device avoids. Its settings,
the paper's: ``severity = 3, width = 3, depth = -1, alpha = 1``. Expected effect: lower
corruption error and a small clean-accuracy gain on long runs; per step, ``width`` times the
image work of RandAugment at depth 1-3.

**Composes badly with.** RandAugment (two per-image augmentation policies; RandAugment is
ordered first if both are used). Evaluating on ImageNet-C/CIFAR-10-C with ``"all"``, whose
color/contrast/brightness/sharpness overlap the test corruptions. Small models and short
runs (a regulariser).

Functional twin: :func:`augmix_batch`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from speedup.algorithms.mixup import image_augmentation, sample_beta, sample_dirichlet
from speedup.algorithms.randaugment import (
    apply_ops,
    augmentation_ops,
    check_augmentation_set,
    check_images,
    from_unit,
    to_unit,
)

from speedup.algorithm import Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["AugMix", "augmix_batch", "augmix_weights"]

#: Chain depths drawn when ``depth = -1`` (the paper's 1 to 3).
RANDOM_DEPTHS = (1, 3)


def augmix_weights(
    n: int, width: int = 3, alpha: float = 1.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mixing weights: chain weights ``[n, width]`` ~ Dirichlet(alpha) (rows sum to
    1) and the original image's weight ``[n]`` ~ Beta(alpha, alpha); float32, CPU."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    chains = sample_dirichlet(torch.full((n, width), float(alpha)), generator)
    original = sample_beta(alpha, alpha, (n,), generator)
    return chains.float(), original.float()


def augmix_batch(
    inputs: torch.Tensor,
    severity: float = 3,
    depth: int = -1,
    width: int = 3,
    alpha: float = 1.0,
    augmentation_set: str = "safe",
    generator: torch.Generator | None = None,
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """AugMix every image of ``inputs`` [N, C, H, W] (no JSD loss). Chains of ``depth``
    operations (``-1``: 1-3, drawn per chain) from ``augmentation_set`` at levels uniform in
    [0.1, ``severity``] / 10; ``width`` chains mixed by Dirichlet weights, then blended with the
    original by a Beta weight. Draws come from ``generator`` (CPU) or torch's global RNG.
    Returns a new tensor of the inputs' dtype."""
    check_images(inputs, "augmix")
    if not 0 < severity <= 10:
        raise ValueError(f"severity must be in (0, 10], got {severity}")
    if depth != -1 and depth < 1:
        raise ValueError(f"depth must be -1 (random 1-3) or >= 1, got {depth}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    names = augmentation_ops(augmentation_set)
    n, c, h, w = inputs.shape
    rows = width * n  # chain j of image i is row j * n + i
    if depth == -1:
        depths = torch.randint(RANDOM_DEPTHS[0], RANDOM_DEPTHS[1] + 1, (rows,), generator=generator)
    else:
        depths = torch.full((rows,), depth)
    unit, mapping = to_unit(inputs, value_range)
    fill = (-mapping.low / mapping.scale).clamp(0, 1)
    chains = unit.repeat(width, 1, 1, 1)
    low = min(0.1, severity)
    for layer in range(int(depths.max())):
        choice = torch.randint(len(names), (rows,), generator=generator)
        choice[depths <= layer] = -1  # this chain has ended
        level = (low + (severity - low) * torch.rand(rows, generator=generator)) / 10
        sign = torch.randint(0, 2, (rows,), generator=generator).double() * 2 - 1
        chains = apply_ops(chains, names, choice, level.double(), sign, fill)
    chain_weights, original_weight = augmix_weights(n, width, alpha, generator)
    chain_weights = chain_weights.t().to(inputs.device, non_blocking=True)  # [width, n]
    mix = torch.einsum("jn,jnchw->nchw", chain_weights, chains.view(width, n, c, h, w))
    original_weight = original_weight.to(inputs.device, non_blocking=True).view(n, 1, 1, 1)
    return from_unit(torch.lerp(mix, unit, original_weight), mapping).to(inputs.dtype)


class AugMix(Algorithm):
    """Blend each training image with a random mixture of augmentation chains (no JSD loss)."""

    name = "augmix"
    # Hendrycks et al. 2020 (Sec. 4): severity 3, width 3; the ablations span these.
    SEARCH_SPACE = {
        "severity": {"type": "float", "low": 1.0, "high": 6.0},
        "width": {"type": "int", "low": 1, "high": 4},
    }

    def __init__(
        self,
        severity: float = 3,
        depth: int = -1,
        width: int = 3,
        alpha: float = 1.0,
        augmentation_set: str = "safe",
    ) -> None:
        if not (isinstance(severity, (int, float)) and 0 < severity <= 10):
            raise ValueError(f"augmix.severity must be in (0, 10], got {severity}")
        if not isinstance(depth, int) or isinstance(depth, bool) or (depth != -1 and depth < 1):
            raise ValueError(
                f"augmix.depth must be -1 (random 1-3) or an integer >= 1, got {depth}"
            )
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"augmix.width must be an integer >= 1, got {width}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"augmix.alpha must be > 0, got {alpha}")
        check_augmentation_set(augmentation_set, "augmix")
        self.severity = float(severity)
        self.depth = depth
        self.width = width
        self.alpha = float(alpha)
        self.augmentation_set = augmentation_set

    def declare(self) -> Declaration:
        return image_augmentation(self.name)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        batch = state.batch
        batch["inputs"] = augmix_batch(
            batch["inputs"],
            self.severity,
            self.depth,
            self.width,
            self.alpha,
            self.augmentation_set,
        )
