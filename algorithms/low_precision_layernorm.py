"""Low-precision LayerNorm.

**What.** Under autocast, PyTorch runs ``layer_norm`` in float32 (it is on autocast's
fp32 list): a bf16/fp16 activation is upcast, normalised and returned as fp32, and the next
matmul casts it back down. This surgery replaces every ``nn.LayerNorm`` with
:class:`LPLayerNorm`, which under autocast normalises in the autocast dtype itself (input,
weight and bias cast down; the kernel still accumulates its statistics in fp32) and returns
that dtype: half the memory traffic of the LayerNorm and its output, and no casts around it.
Without autocast (``precision: fp32``) it is exactly ``nn.LayerNorm``. Parameters are shared
with the replaced module (same names, same tensors), so checkpoints and optimizers see no
difference; they stay fp32 master weights.

**When it helps.** Transformers trained in bf16 or fp16 on GPUs, where LayerNorm is
memory-bound. Composer's method card (low_precision_layernorm) reports better speed/quality
trade-offs and recommends it in its bf16 and AMP recipes; it replaced Composer's fused-kernel
LayerNorm at "very similar" throughput, and MosaicBERT (Portes et al. 2023) uses it. Results
match fp32 LayerNorm to bf16 rounding (2-3 significant digits); Composer warns of
occasional loss spikes. No effect in fp32 (a warning says so) and little on CPUs.

**Applies to** any model with ``nn.LayerNorm`` (BERT and GPT-2 here, also ViTs and MLP
mixers): ``model_kinds`` is not restricted. Subclasses of LayerNorm with their own forward
are left alone.

**Composes badly with.** Nothing known. It runs after other surgery at INIT (declared after
``alibi`` and ``gated_linear_units``), so LayerNorms that surgery creates are converted too.

Functional twin: :func:`apply_low_precision_layernorm`.
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

__all__ = ["LPLayerNorm", "LowPrecisionLayerNorm", "apply_low_precision_layernorm"]


class LPLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that, under autocast, computes and returns the autocast dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(device, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)


def _low_precision(norm: nn.LayerNorm) -> LPLayerNorm:
    """An LPLayerNorm holding ``norm``'s own parameters (the same tensors)."""
    new = LPLayerNorm(
        norm.normalized_shape,
        eps=norm.eps,
        elementwise_affine=norm.elementwise_affine,
        bias=norm.bias is not None,
        device="meta",  # placeholders, replaced by the shared parameters below
    )
    if norm.weight is not None:
        new.weight = norm.weight
    if norm.bias is not None:
        new.bias = norm.bias
    new.train(norm.training)
    return new


def apply_low_precision_layernorm(model: nn.Module) -> int:
    """Replace every ``nn.LayerNorm`` in ``model`` (exactly that class) with an
    :class:`LPLayerNorm` sharing its parameters, in place; returns how many were replaced.
    A LayerNorm reachable under several names becomes one LPLayerNorm under all of them."""

    def build(child: nn.Module) -> nn.Module | None:
        return _low_precision(child) if type(child) is nn.LayerNorm else None

    return len(replace_modules(model, build))


class LowPrecisionLayerNorm(Algorithm):
    """Run LayerNorm in the autocast dtype (bf16/fp16) instead of upcasting to fp32."""

    name = "low_precision_layernorm"

    def __init__(self) -> None:
        #: LayerNorm modules replaced at INIT.
        self.replaced = 0

    def declare(self) -> Declaration:
        # Its place in the one total order of INIT surgery (_init_order): after the surgeries
        # that leave or create LayerNorms, so it sees every one of them.
        return init_surgery("low_precision_layernorm", reads={"precision"})

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.replaced = apply_low_precision_layernorm(state.model)
        if self.replaced == 0 and not any(
            isinstance(m, LPLayerNorm) for m in state.model.modules()
        ):
            warnings.warn("low_precision_layernorm: the model has no nn.LayerNorm", stacklevel=2)
        if state.precision == "fp32":
            warnings.warn(
                "low_precision_layernorm has no effect with precision fp32 (no autocast); "
                "use bf16 or fp16",
                stacklevel=2,
            )
        logger.log_metrics({"low_precision_layernorm/replaced": float(self.replaced)})
