"""CutMix.

**What.** Pastes a box cut from a partner image into each image and mixes the labels in
proportion to the areas (Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong
Classifiers with Localizable Features", ICCV, eqs. 1-2): draw ``lam ~ Beta(alpha, alpha)``,
take a box of side ``sqrt(1 - lam)`` times the image's sides centred on a uniformly random
pixel, clip it to the image, and set ``lam`` to the fraction of the image the box leaves
uncovered, so the label weights equal the pixel shares exactly. As in the paper's reference
code and Composer, one box and one ``lam`` serve the whole batch and partners come from a
random permutation: the cost is one slice copy.

**When it helps.** Image classification with conv nets, long schedules. Yun et al. report
ImageNet ResNet-50 top-1 error 23.68% -> 21.40% (300 epochs, ``alpha = 1``; MixUp 22.58%,
Cutout 22.93% in the same table), plus better weakly-supervised localisation and
robustness; ``alpha = 1`` (uniform ``lam``) is their and Composer's
setting. Expected effect: higher final accuracy on long runs at negligible per-step cost;
like all strong regularisers it can hurt short runs and small models.

**Composes badly with.** MixUp (both interpolate the targets: declared incompatible).
CutOut and other occluders (redundant regularisation). Losses that need class indices: the
targets are probabilities ``[N, K]`` at the loss. Label smoothing composes on the mixed
probabilities (declared order). Runs after ColOut, so the area is measured on the final image.

**How it runs here.** As :mod:`speedup.algorithms.mixup`: the inputs are mixed at
AFTER_DATALOADER on the whole batch, targets become probabilities at BEFORE_LOSS and are
restored at BEFORE_BACKWARD; draws come from torch's global CPU RNG; eval is untouched.

Functional twin: :func:`cutmix_batch`.
"""

from __future__ import annotations

import math

import torch
from speedup.algorithms.mixup import (
    Mixed,
    MixingAlgorithm,
    mix_batch,
    random_permutation,
    sample_beta,
)

__all__ = ["CutMix", "cutmix_batch", "cutmix_box"]


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """The box ``(top, bottom, left, right)`` (half-open) for a target ``lam``: sides
    ``int(side * sqrt(1 - lam))``, centred on a uniformly random pixel, clipped to the image."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    ratio = math.sqrt(1.0 - lam)
    box_h, box_w = int(height * ratio), int(width * ratio)
    centre = torch.randint(0, height * width, (1,), generator=generator).item()
    cy, cx = divmod(int(centre), width)
    top, left = cy - box_h // 2, cx - box_w // 2
    return max(top, 0), min(top + box_h, height), max(left, 0), min(left + box_w, width)


def _cutmix_inputs(
    inputs: torch.Tensor, alpha: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, float, torch.Tensor]:
    if inputs.dim() < 3:
        raise ValueError(f"cutmix needs images [N, C, H, W], got shape {tuple(inputs.shape)}")
    height, width = inputs.shape[-2:]
    lam = float(sample_beta(alpha, alpha, generator=generator))
    permutation = random_permutation(inputs.shape[0], inputs.device, generator)
    top, bottom, left, right = cutmix_box(height, width, lam, generator)
    mixed = inputs.clone()
    mixed[..., top:bottom, left:right] = inputs[..., top:bottom, left:right][permutation]
    area = (bottom - top) * (right - left)
    return mixed, 1.0 - area / (height * width), permutation


def cutmix_batch(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
) -> Mixed:
    """CutMix a batch of images ``[N, C, H, W]`` with one box for the whole batch.

    Returns :class:`~speedup.algorithms.mixup.Mixed`: ``inputs`` with the box filled from
    ``inputs[permutation]``, ``lam`` = the fraction of each image outside the box (the drawn
    value corrected to the clipped box), and targets ``lam * own + (1 - lam) * partner``.
    """
    return mix_batch("cutmix", _cutmix_inputs, inputs, targets, num_classes, alpha, generator)


class CutMix(MixingAlgorithm):
    """Paste a box from a partner image and mix the labels by area (one box per batch)."""

    name = "cutmix"
    # Yun et al. 2019 (CutMix, Sec. 4.1) use alpha 1.0; smaller alphas mix less.
    SEARCH_SPACE = {"alpha": {"type": "float", "low": 0.2, "high": 1.0, "log": True}}

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha)

    def _mix(self, inputs: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
        return _cutmix_inputs(inputs, self.alpha, None)
