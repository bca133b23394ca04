"""Low-precision GroupNorm under autocast.

**What.** CUDA autocast lists ``group_norm`` among the ops it runs in float32 whatever the
surrounding precision: its input is upcast from bf16/fp16, normalised in fp32 and the fp32
output feeds the next layer, which casts it down again (CPU autocast leaves it in the
input's dtype, so an fp32 input stays fp32). This surgery swaps every ``nn.GroupNorm`` for
:class:`LPGroupNorm`, which under autocast casts the input, weight and bias to the autocast
dtype and runs ``group_norm`` there with autocast disabled, halving the memory traffic of
the layer and of its neighbours' casts. Outside autocast it is ``nn.GroupNorm`` exactly. The
math is the same, the rounding is that of the low-precision dtype (the kernels still
accumulate statistics in fp32 internally): outputs differ from fp32 GroupNorm by about
bf16/fp16 resolution. It is active only when the run's ``precision`` is ``bf16`` or ``fp16``
(autocast); at ``fp32`` the algorithm does nothing.

**When it helps.** GroupNorm-heavy conv nets (GN+WS ResNets, diffusion UNets) trained with
mixed precision on GPUs, where normalisation is memory-bound. Composer's method card
(composer/algorithms/low_precision_groupnorm/README.md) reports better speed/quality
trade-offs and "very similar throughput" to its fused-kernel GroupNorm, which this replaced;
it gives no isolated figure. Expected effect: a higher step throughput on GPU, unchanged
convergence (rare loss spikes are the risk Composer names). No effect on CPU-bound runs.

**Composes badly with.** fp32 training (nothing to do), and models whose GroupNorm inputs
have a range that bf16/fp16 cannot hold (fp16 overflow above 65504).

Functional twin: :func:`apply_low_precision_groupnorm` (and :func:`low_precision_group_norm`).
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
    "LPGroupNorm",
    "LowPrecisionGroupNorm",
    "apply_low_precision_groupnorm",
    "low_precision_group_norm",
]

_LOW_PRECISIONS = ("bf16", "fp16")


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return tensor if tensor is None else tensor.to(dtype)


def low_precision_group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.group_norm`` in the autocast dtype when autocast is on for ``x``'s device (input,
    weight and bias cast down, output in that dtype); plain ``F.group_norm`` otherwise."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return F.group_norm(x, num_groups, weight, bias, eps)
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        return F.group_norm(x.to(dtype), num_groups, _cast(weight, dtype), _cast(bias, dtype), eps)


class LPGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that runs in the autocast dtype (:func:`low_precision_group_norm`)."""

    @classmethod
    def from_groupnorm(cls, norm: nn.GroupNorm) -> LPGroupNorm:
        """An LPGroupNorm sharing ``norm``'s weight and bias tensors."""
        new = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
        new.weight, new.bias = norm.weight, norm.bias
        new.train(norm.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return low_precision_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def apply_low_precision_groupnorm(model: nn.Module) -> int:
    """Replace every ``nn.GroupNorm`` in ``model`` by :class:`LPGroupNorm`, in place, sharing
    its weight and bias (an optimizer built before still holds them). Returns how many."""

    def build(child: nn.Module) -> nn.Module | None:
        return LPGroupNorm.from_groupnorm(child) if type(child) is nn.GroupNorm else None

    return len(replace_modules(model, build))


class LowPrecisionGroupNorm(Algorithm):
    """Run GroupNorm in bf16/fp16 under autocast instead of fp32 (Composer)."""

    name = "low_precision_groupnorm"

    def __init__(self) -> None:
        #: How many GroupNorm layers the last surgery replaced (0 also when inactive at fp32).
        self.replaced = 0

    def declare(self) -> Declaration:
        # Its place in the one total order of INIT surgery (_init_order): after the vision
        # surgery that creates or moves GroupNorms, so it replaces those too.
        return init_surgery(
            "low_precision_groupnorm",
            reads={"model.modules", "precision"},
            model_kinds={"cnn"},
            data_kinds={"image"},
        )

    def match(self, event: Event, state: State) -> bool:
        if state.precision in _LOW_PRECISIONS:
            return True
        warnings.warn(
            f"low_precision_groupnorm has no effect at precision {state.precision!r} "
            f"(it needs {' or '.join(_LOW_PRECISIONS)})",
            stacklevel=2,
        )
        return False

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.replaced = apply_low_precision_groupnorm(state.model)
        if not self.replaced:
            warnings.warn(
                "low_precision_groupnorm found no GroupNorm: it has no effect", stacklevel=2
            )
