"""Ghost batch normalisation: BatchNorm statistics over small virtual batches.

**What.** Hoffer et al. (2017, "Train longer, generalize better: closing the generalization
gap in large batch training of neural networks", NeurIPS; Algorithm 1) split each training
batch into "ghost" batches of ``ghost_batch_size`` samples and normalise each with its own
mean and variance, so a large batch keeps the noisier, regularising statistics of a small
one. For ghost batch ``g``: ``y = (x - mean_g) / sqrt(var_g + eps) * gamma + beta`` with
``mean_g``, ``var_g`` (biased) per channel over the ghost batch's samples and positions.

**Uneven batches.** Algorithm 1 assumes the batch divides by the ghost size. When it does
not, a batch of ``N`` is split into ``k = ceil(N / ghost_batch_size)`` ghost batches whose
sizes differ by at most one (``torch.tensor_split``): 100 samples in ghosts of 32 are four
of 25, not 32, 32, 32 and a noisy 4. Composer's reference (``_GhostBatchNorm.forward`` in
composer/algorithms/ghost_batchnorm/ghost_batchnorm.py) uses the same ``k`` with
``torch.chunk``, which agrees when ``k`` divides ``N`` (four of 25 there too) but otherwise
makes every chunk ``ceil(N / k)`` long except a shorter last one (14 in ghosts of 4: 4, 4, 4,
2 there; 4, 4, 3, 3 here).

**Running statistics** move once per step towards the average over ghost batches of their
means and unbiased variances (with the layer's momentum, or the cumulative average when it
is None), so ``momentum`` keeps its per-step BatchNorm meaning and the statistics track what
plain BatchNorm would at that ghost batch size. Algorithm 1 updates once per ghost batch with
the full momentum (``k`` updates a step, so a larger effective momentum); Composer divides
the momentum by ``k`` for its ``k`` updates, which differs from one update per step only at
second order in the momentum. Evaluation uses the running statistics, exactly like BatchNorm. All
ghost batches of one size are normalised in one vectorised pass (``var_mean`` over a ``[k,
g, C, *spatial]`` view, then one multiply-add), not a loop over chunks.

Surgery swaps ``nn.BatchNorm1d``/``2d``/``3d`` (exact types; SyncBatchNorm is left alone) for
:class:`GhostBatchNorm1d`/``2d``/``3d``, subclasses that adopt the original weight, bias
and running-statistics tensors (same state-dict keys).

**When it helps.** Large per-device batches, where BatchNorm's statistics are too smooth to
regularise. Hoffer et al. use ghost batches of 128 inside batches of 4096 and close part of
the large-batch generalisation gap on CIFAR-10/100 and ImageNet (their Table 1). Composer's
method card (composer/algorithms/ghost_batchnorm/README.md) is negative at ImageNet scale:
ResNet-50 top-1 changed by -0.3 to +0.3 points and throughput fell about 5%; it suggests
ghost batches of 16 to 64 (32 is its default, and ours). Expected effect: none to small
accuracy changes at ordinary batch sizes, a slower step.

**Composes badly with.** Small batches (a batch no larger than ``ghost_batch_size`` is plain
BatchNorm), gradient accumulation (microbatches already are ghost batches of their size),
and SyncBatchNorm (not replaced). Other regularisers at once (diminishing returns).

Functional twin: :func:`apply_ghost_batchnorm` (and :func:`ghost_batch_norm` on tensors).
"""

from __future__ import annotations

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
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "apply_ghost_batchnorm",
    "ghost_batch_norm",
    "ghost_sizes",
]


def _normalize_ghosts(
    ghosts: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise ``ghosts`` ``[k, g, C, *spatial]`` per (ghost batch, channel). Returns the
    output and each ghost batch's mean and biased variance, ``[k, C]`` in float32."""
    dims = (1, *range(3, ghosts.dim()))
    stats_input = ghosts if ghosts.dtype in (torch.float32, torch.float64) else ghosts.float()
    var, mean = torch.var_mean(stats_input, dim=dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + eps)
    view = (1, 1, -1) + (1,) * (ghosts.dim() - 3)
    if weight is not None:
        scale = scale * weight.view(view)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.view(view)
    out = torch.addcmul(shift.to(ghosts.dtype), ghosts, scale.to(ghosts.dtype))
    return out, mean.flatten(1), var.flatten(1)


def ghost_sizes(batch_size: int, ghost_batch_size: int) -> list[int]:
    """The ghost batch sizes a batch of ``batch_size`` splits into: ``ceil(batch_size /
    ghost_batch_size)`` of them, the larger first, differing by at most one."""
    k = -(-batch_size // ghost_batch_size)
    base, extra = divmod(batch_size, k)
    return [base + 1] * extra + [base] * (k - extra)


def ghost_batch_norm(
    x: torch.Tensor,
    ghost_batch_size: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Training-mode batch norm of ``x`` ``[N, C, ...]`` with statistics per ghost batch:
    consecutive groups of the sizes :func:`ghost_sizes` gives.

    Equals ``torch.cat([F.batch_norm(c, None, None, weight, bias, True, 0, eps) for c in
    x.tensor_split(k)])`` with ``k = ceil(N / ghost_batch_size)``. When given,
    ``running_mean``/``running_var`` move by ``momentum`` towards the mean over ghost batches
    of their means and unbiased variances, in place. A batch of at most ``ghost_batch_size``
    is ``F.batch_norm`` itself.
    """
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}")
    n = x.shape[0]
    if n <= ghost_batch_size:
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    sizes = ghost_sizes(n, ghost_batch_size)
    pixels = x[0, 0].numel()
    if sizes[-1] * pixels < 2:
        raise ValueError(
            f"ghost batch norm needs more than 1 value per channel in each ghost batch "
            f"(ghost_batch_size {ghost_batch_size}, input {tuple(x.shape)})"
        )
    # At most two distinct sizes: one [k, g, C, ...] view (and pass) per size.
    larger = sizes.count(sizes[0]) if sizes[0] != sizes[-1] else 0
    split = larger * sizes[0]
    parts = [x[:split].view(larger, sizes[0], *x.shape[1:])] if larger else []
    parts.append(x[split:].view(len(sizes) - larger, sizes[-1], *x.shape[1:]))
    outputs, means, variances = [], [], []
    for part in parts:
        out, mean, var = _normalize_ghosts(part, weight, bias, eps)
        outputs.append(out.flatten(0, 1))
        means.append(mean)
        count = part.shape[1] * pixels  # values per channel in each of these ghost batches
        variances.append(var * (count / (count - 1)))  # unbiased, as BatchNorm tracks
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.lerp_(torch.cat(means).mean(0).to(running_mean.dtype), momentum)
            running_var.lerp_(torch.cat(variances).mean(0).to(running_var.dtype), momentum)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class _GhostBatchNorm:
    """The ghost-batch training forward shared by the 1d, 2d and 3d classes; mixed in before
    the matching ``nn.BatchNormNd``, which keeps its input check and its eval forward."""

    def __init__(self, num_features: int, ghost_batch_size: int = 32, **kwargs) -> None:  # noqa: ANN003
        super().__init__(num_features, **kwargs)
        if ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}")
        self.ghost_batch_size = ghost_batch_size

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, ghost_batch_size: int) -> nn.Module:
        """A ghost layer sharing ``bn``'s weight, bias and running-statistics tensors."""
        new = cls(
            bn.num_features,
            ghost_batch_size,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device="meta",
        )
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)  # eval is plain BatchNorm: the running statistics
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as BatchNorm does
                factor = 1.0 / float(self.num_batches_tracked)
        return ghost_batch_norm(
            x,
            self.ghost_batch_size,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            factor,
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (``[N, C]`` or ``[N, C, L]``) with training statistics per ghost
    batch (:func:`ghost_batch_norm`); eval is plain BatchNorm."""


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with training statistics per ghost batch (:func:`ghost_batch_norm`);
    eval is plain BatchNorm."""


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with training statistics per ghost batch (:func:`ghost_batch_norm`);
    eval is plain BatchNorm."""


_GHOST_OF: dict[type[nn.Module], type[_GhostBatchNorm]] = {
    nn.BatchNorm1d: GhostBatchNorm1d,
    nn.BatchNorm2d: GhostBatchNorm2d,
    nn.BatchNorm3d: GhostBatchNorm3d,
}


def apply_ghost_batchnorm(model: nn.Module, ghost_batch_size: int = 32) -> int:
    """Replace every ``nn.BatchNorm1d``/``2d``/``3d`` in ``model`` by its ghost counterpart,
    in place, sharing its tensors (an optimizer built before still holds them). Returns how
    many."""
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}")

    def build(child: nn.Module) -> nn.Module | None:
        ghost = _GHOST_OF.get(type(child))  # exact types: ghost layers are not rebuilt
        return None if ghost is None else ghost.from_batchnorm(child, ghost_batch_size)

    return len(replace_modules(model, build))


class GhostBatchNorm(Algorithm):
    """Normalise with BatchNorm statistics of small ghost batches (Hoffer et al. 2017)."""

    name = "ghost_batchnorm"
    # Hoffer et al. 2017 (Sec. 4.1) use ghost batches of 128; smaller ones regularise more.
    SEARCH_SPACE = {"ghost_batch_size": {"type": "categorical", "choices": [16, 32, 64, 128]}}

    def __init__(self, ghost_batch_size: int = 32) -> None:
        if (
            isinstance(ghost_batch_size, bool)
            or not isinstance(ghost_batch_size, int)
            or ghost_batch_size < 1
        ):
            raise ValueError(
                f"ghost_batchnorm.ghost_batch_size must be an integer >= 1, got {ghost_batch_size}"
            )
        self.ghost_batch_size = ghost_batch_size
        #: How many BatchNorm layers the last surgery replaced.
        self.replaced = 0

    def declare(self) -> Declaration:
        # BatchNorm1d in 1-D conv nets (signals) too.
        return init_surgery("ghost_batchnorm", model_kinds={"cnn"}, data_kinds={"image", "signal"})

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.replaced = apply_ghost_batchnorm(state.model, self.ghost_batch_size)
        if not self.replaced:
            warnings.warn(
                "ghost_batchnorm found no BatchNorm1d/2d/3d: it has no effect", stacklevel=2
            )
