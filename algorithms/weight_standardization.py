"""Weight standardisation of convolution kernels.

**What.** Qiao et al. (2019, "Micro-batch training with batch-channel normalization and weight
standardization", arXiv:1903.10520; section 3) reparametrise every convolution weight
so each output channel's kernel has zero mean and unit variance over its fan-in
(input channels x kernel extent), and convolve with the standardised kernel; gradients flow
through the standardisation to the raw ``W``. They show it smooths the loss landscape (smaller
Lipschitz constants of the loss and its gradients) and pair it with GroupNorm for micro-batch
training. This follows the authors' reference code (github.com/joe-siyuan-qiao/
WeightStandardization, ``Conv2d.forward``): ``W_hat[o] = (W[o] - mean(W[o])) / (std(W[o]) +
eps)`` with ``std`` the *unbiased* (Bessel-corrected, ``torch.std``'s default) standard
deviation and ``eps = 1e-5`` added to the standard deviation, not to the variance. Where eps
goes matters: Kaiming-initialised kernels have a tiny variance (``2 / fan_in``: 4.3e-4 for a
512x3x3 fan-in, and 7.2e-5 at PyTorch's default init), so ``sqrt(var + 1e-5)`` shrank them
to variance 0.977 (0.879 at default init), while ``std + 1e-5`` leaves 0.999 (0.998).
Implemented with ``torch.nn.utils.parametrize``: the raw weight lives at
``<conv>.parametrizations.weight.original`` and ``<conv>.weight`` is computed from it at each
forward. ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` are standardised (the fan-in is every
dim but the first); transposed convolutions are not (their dim 0 is the input channel), nor
convolutions with a fan-in of one (a single value standardises to 0; the reference divides
0 by NaN there). ``n_last_layers_ignore`` leaves the last convolutions (in module definition
order) unstandardised, for conv classifier heads; when it is at least the number of
convolutions, none is standardised.

**When it helps.** Normalised conv nets, especially with small per-device batches and
GroupNorm, where Qiao et al. report GN+WS at 1 image per GPU matching or beating BatchNorm
at large batch on ImageNet, COCO and VOC (abstract). Composer's method card
(composer/algorithms/weight_standardization/README.md): ResNet-50/ImageNet +0.08 points top-1
(about neutral), DeepLabv3+ on ADE20k +0.7 mIoU with ``n_last_layers_ignore=15``, larger gains
early in training, a small throughput cost (the standardisation runs every step).

**Composes badly with.** Convolutions not followed by a normalisation layer (WS fixes each
kernel's scale; the authors apply it only before BN/GN), pretrained weights not trained with
WS, and magnitude pruning (masks zero the raw weight, but standardisation shifts the zeros
to ``-mean / std``, so the effective kernel is dense: declared incompatible). Surgery that
copies ``conv.weight`` as a tensor (BlurPool) must run before it (declared order).

Functional twin: :func:`apply_weight_standardization` (and :func:`standardize_weight`;
:func:`standardized_state_dict` turns a checkpoint's raw weights into a plain network's).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
from speedup.algorithms._init_order import init_surgery
from torch import nn
from torch.nn.utils import parametrize

from speedup.algorithm import Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "WeightStandardization",
    "WeightStandardizer",
    "apply_weight_standardization",
    "standardize_weight",
    "standardized_state_dict",
]

_RAW = ".parametrizations.weight.original"

#: The convolutions whose weight is ``[out_channels, in_channels / groups, *kernel]``.
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``(W - mean) / (std + eps)`` per output channel (dim 0), over all other dims, with the
    unbiased ``std`` as in Qiao et al.'s reference code. Needs a fan-in of at least 2."""
    dims = tuple(range(1, weight.dim()))
    fan_in = weight[0].numel()
    if fan_in < 2:
        raise ValueError(
            f"weight standardization needs a fan-in of at least 2, got weight {tuple(weight.shape)}"
        )
    std, mean = torch.std_mean(weight, dim=dims, correction=1, keepdim=True)
    return (weight - mean) / (std + eps)


class WeightStandardizer(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrisation computing :func:`standardize_weight`."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return standardize_weight(weight, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def _standardized(conv: nn.Module) -> bool:
    if not parametrize.is_parametrized(conv, "weight"):
        return False
    return any(isinstance(p, WeightStandardizer) for p in conv.parametrizations.weight)


def _fan_in(conv: nn.Module) -> int:
    # From the attributes, not conv.weight: on a parametrised conv that would compute it.
    return conv.in_channels // conv.groups * math.prod(conv.kernel_size)


def apply_weight_standardization(
    model: nn.Module, n_last_layers_ignore: int = 0, eps: float = 1e-5
) -> int:
    """Standardise the weights of every ``nn.Conv1d``/``Conv2d``/``Conv3d`` in ``model`` but
    the last ``n_last_layers_ignore`` (module definition order), in place. Returns how many.

    The raw weight becomes ``conv.parametrizations.weight.original``, a new parameter object:
    build the optimizer afterwards (the Trainer does, since this runs at INIT). Convolutions
    already standardised, and those with a fan-in of one, are skipped (but still counted by
    ``n_last_layers_ignore``).
    """
    if n_last_layers_ignore < 0:
        raise ValueError(f"n_last_layers_ignore must be >= 0, got {n_last_layers_ignore}")
    convs = [m for m in model.modules() if isinstance(m, _CONVS)]
    # max(0, ...): ignoring more layers than there are must leave all of them alone, not
    # slice from the front with a negative end.
    chosen = convs[: max(0, len(convs) - n_last_layers_ignore)]
    count = 0
    for conv in chosen:
        if _standardized(conv) or _fan_in(conv) < 2:
            continue
        parametrize.register_parametrization(conv, "weight", WeightStandardizer(eps))
        count += 1
    return count


def standardized_state_dict(
    state: dict[str, torch.Tensor], eps: float = 1e-5
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with every standardised raw weight (``<conv>.parametrizations.
    weight.original``) replaced by the effective one under ``<conv>.weight``: the weights a
    plain network (no parametrisation) needs to compute what the trained one computes.
    Other keys pass through. Use it to export a model trained with this algorithm."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(_RAW):
            out[key[: -len(_RAW)] + ".weight"] = standardize_weight(value.detach(), eps)
        else:
            out[key] = value
    return out


class WeightStandardization(Algorithm):
    """Standardise conv kernels per output channel: zero mean, unit variance (Qiao et al. 2019)."""

    name = "weight_standardization"

    def __init__(self, n_last_layers_ignore: int = 0, eps: float = 1e-5) -> None:
        if (
            isinstance(n_last_layers_ignore, bool)
            or not isinstance(n_last_layers_ignore, int)
            or n_last_layers_ignore < 0
        ):
            raise ValueError(
                "weight_standardization.n_last_layers_ignore must be an integer >= 0, "
                f"got {n_last_layers_ignore}"
            )
        if not eps > 0:
            raise ValueError(f"weight_standardization.eps must be > 0, got {eps}")
        self.n_last_layers_ignore = n_last_layers_ignore
        self.eps = eps
        #: How many convolutions the last surgery standardised.
        self.standardized = 0

    def exported_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return standardized_state_dict(weights, self.eps)

    def declare(self) -> Declaration:
        return init_surgery(
            "weight_standardization",
            incompatible_with={"magnitude_pruning"},
            model_kinds={"cnn"},
            data_kinds={"image", "signal"},  # Conv1d nets on signals (MNIST-1D) too
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.standardized = apply_weight_standardization(
            state.model, self.n_last_layers_ignore, self.eps
        )
        if not self.standardized:
            warnings.warn(
                "weight_standardization found no Conv1d/Conv2d/Conv3d to standardise (or "
                "n_last_layers_ignore covers them all): it has no effect",
                stacklevel=2,
            )
