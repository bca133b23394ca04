"""Ghost batch normalisation: BatchNorm statistics over small virtual batches.

**What.** Hoffer et al. (2017, "Train longer, generalize better: closing the generalization
gap in large batch training of neural networks", NeurIPS; Algorithm 1) split each training
batch into "ghost" batches of ``ghost_batch_size`` samples and normalise each with its own
mean and variance, so a large batch keeps the noisier, regularising statistics of a small
one. For ghost batch ``g``: ``y = (x - mean_g) / sqrt(var_g + eps) * gamma + beta`` with
``mean_g``, ``var_g`` (biased) per channel over the ghost batch's samples and pixels. The last
ghost batch is smaller when the batch size is not a multiple. The running statistics move
once per step towards the average of the ghost batches' means and unbiased variances (with
the layer's momentum), so they track what plain BatchNorm would at that ghost batch size.
Evaluation uses the running statistics, exactly like BatchNorm. All ghost batches are
normalised in one vectorised pass (``var_mean`` over a ``[k, g, C, H, W]`` view, then one
multiply-add), not a loop over chunks.

Surgery swaps ``nn.BatchNorm2d`` for :class:`GhostBatchNorm2d`, a ``BatchNorm2d`` subclass that
adopts the original weight, bias and running-statistics tensors (same state-dict keys).

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

import torch
import torch.nn.functional as F
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.event import Event
from speedup.surgery import replace_modules

__all__ = ["GhostBatchNorm", "GhostBatchNorm2d", "apply_ghost_batchnorm", "ghost_batch_norm"]


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
    """Training-mode batch norm of ``x`` ``[N, C, ...]`` with statistics per consecutive
    ``ghost_batch_size`` samples (the last group may be smaller).

    Equals ``torch.cat([F.batch_norm(c, None, None, weight, bias, True, 0, eps) for c in
    x.split(ghost_batch_size)])``. When given, ``running_mean``/``running_var`` move by
    ``momentum`` towards the mean over ghost batches of their means and unbiased variances,
    in place. A batch of at most ``ghost_batch_size`` is ``F.batch_norm`` itself.
    """
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}")
    n = x.shape[0]
    if n <= ghost_batch_size:
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    pixels, rest = x[0, 0].numel(), n % ghost_batch_size
    if ghost_batch_size * pixels < 2 or 0 < rest * pixels < 2:
        raise ValueError(
            f"ghost batch norm needs more than 1 value per channel in each ghost batch "
            f"(ghost_batch_size {ghost_batch_size}, input {tuple(x.shape)})"
        )
    full = n - rest
    k = full // ghost_batch_size
    parts = [x[:full].view(k, ghost_batch_size, *x.shape[1:])]
    if full < n:
        parts.append(x[full:].unsqueeze(0))
    outputs, means, variances, counts = [], [], [], []
    for part in parts:
        out, mean, var = _normalize_ghosts(part, weight, bias, eps)
        outputs.append(out.flatten(0, 1))
        means.append(mean)
        variances.append(var)
        counts.append(part[0].numel() // part.shape[2])
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            unbiased = torch.cat([v * (c / (c - 1)) for v, c in zip(variances, counts)])
            running_mean.lerp_(torch.cat(means).mean(0).to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.mean(0).to(running_var.dtype), momentum)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are per ghost batch of
    ``ghost_batch_size`` samples (:func:`ghost_batch_norm`); eval is plain BatchNorm."""

    def __init__(self, num_features: int, ghost_batch_size: int = 32, **kwargs) -> None:  # noqa: ANN003
        super().__init__(num_features, **kwargs)
        if ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}")
        self.ghost_batch_size = ghost_batch_size

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, ghost_batch_size: int) -> GhostBatchNorm2d:
        """A GhostBatchNorm2d sharing ``bn``'s weight, bias and running-statistics tensors."""
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
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
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


def apply_ghost_batchnorm(model: nn.Module, ghost_batch_size: int = 32) -> int:
    """Replace every ``nn.BatchNorm2d`` in ``model`` by :class:`GhostBatchNorm2d`, in place,
    sharing its tensors (an optimizer built before still holds them). Returns how many."""
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}")

    def build(child: nn.Module) -> nn.Module | None:
        if type(child) is nn.BatchNorm2d:
            return GhostBatchNorm2d.from_batchnorm(child, ghost_batch_size)
        return None

    return len(replace_modules(model, build))


class GhostBatchNorm(Algorithm):
    """Normalise with BatchNorm statistics of small ghost batches (Hoffer et al. 2017)."""

    name = "ghost_batchnorm"

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
        return Declaration(
            events={Event.INIT: Access(reads={"model.modules"}, writes={"model.modules"})},
            runs_after={"stochastic_depth", "blurpool", "squeeze_excite", "weight_standardization"},
            model_kinds={"cnn"},
            data_kinds={"image"},
        )

    def apply(self, event: Event, state, logger) -> None:  # noqa: ANN001
        self.replaced = apply_ghost_batchnorm(state.model, self.ghost_batch_size)
        if not self.replaced:
            warnings.warn("ghost_batchnorm found no BatchNorm2d: it has no effect", stacklevel=2)
