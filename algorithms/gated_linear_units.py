"""Gated linear units in BERT's feed-forward blocks.

**What.** Replaces each BERT layer's feed-forward block ``W2 act(x W1)`` (BertIntermediate +
BertOutput) with a gated one, ``W2 (act(x W) * (x V))``: the activation of one projection
gates another, elementwise (Shazeer 2020, "GLU variants improve transformer", eq. 5-6). With
GELU this is GEGLU, with ReLU ReGLU, with SiLU (Swish) SwiGLU, with the identity the bilinear
layer and with the sigmoid Dauphin et al.'s original GLU. BERT's residual connection, dropout
and post-LayerNorm stay as they were (the LayerNorm module is kept, weights and all). The two
input projections run as one fused matmul of width ``2 d_ff``.

**Parameter count.** A third matrix would add 50% to the block, so, as in Shazeer's section 2
and Composer's method card, the hidden width shrinks by ``intermediate_scale=2/3`` (rounded to
a multiple of 8 for tensor cores): BERT-Base's 3072 becomes 2048, and ``3 x 768 x 2048`` equals
``2 x 768 x 3072`` exactly. Composer's code keeps the full 3072 (+50% FFN parameters), as
MosaicBERT does; set ``intermediate_scale=1.0`` for that. Biases follow Composer's advice:
none in the two gated projections (``gated_layer_bias``/``non_gated_layer_bias`` False), a
bias on the output projection as in BERT. New weights are drawn from ``N(0,
initializer_range)`` like the rest of BERT.

**When it helps.** Masked-LM pretraining of BERT from scratch. Shazeer's table 1 (T5-base
span-filling on C4, equal parameters and compute) puts GEGLU and SwiGLU at the best held-out
log-perplexity of the variants, 1.942 and 1.944 against 1.997 for the ReLU baseline after
65,536 steps, and GLU variants also fine-tune better on GLUE and SuperGLUE. Composer's method
card reports much better convergence per step at a slight throughput cost, GELU or ReLU gates
beating Swish and squared ReLU, and no biases in the gated projections as clearly better;
MosaicBERT (Portes et al. 2023) keeps GLU in its recipe (79.6 GLUE in 1.13 h on 8xA100, with
ALiBi and the others).

**Composes badly with.** Fine-tuning a pretrained BERT: the feed-forward weights are
re-initialised (surgery replaces them). Other surgery on BERT's FFN (factorization, pruning
masks taken before INIT). LowPrecisionLayerNorm runs after it (declared), and ALiBi before.

Functional twin: :func:`apply_gated_linear_units`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from speedup.algorithms._init_order import init_surgery
from torch import nn

from speedup.algorithm import Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "ACTIVATIONS",
    "GatedFeedForward",
    "GatedLinearUnits",
    "apply_gated_linear_units",
    "glu_intermediate_size",
]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


#: Gate activations by name: GEGLU, ReGLU, SwiGLU, bilinear and the original sigmoid GLU.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
    "identity": _identity,
}


def glu_intermediate_size(intermediate_size: int, scale: float = 2 / 3) -> int:
    """The gated block's hidden width: ``scale * intermediate_size`` to the nearest multiple of
    8 (at least 8). 3072 -> 2048 at 2/3; 512 -> 344."""
    return max(8, round(intermediate_size * scale / 8) * 8)


class GatedFeedForward(nn.Module):
    """BERT's FFN output stage as a gated unit: ``LayerNorm(x + dropout(W2 (act(x W) * (x
    V)) + b2))``. Called like BertOutput, as ``(hidden_states, input_tensor)``; the
    layer's intermediate stage becomes an identity, so both arguments are the attention
    output."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: Callable[[torch.Tensor], torch.Tensor],
        layer_norm: nn.Module,
        dropout: nn.Module,
        gated_layer_bias: bool = False,
        non_gated_layer_bias: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.intermediate_size = intermediate_size
        # [gate | value] in one matmul; the optional biases stay separate parameters.
        self.input = nn.Linear(hidden_size, 2 * intermediate_size, bias=False, **factory)
        self.gated_bias = self.non_gated_bias = None
        if gated_layer_bias:
            self.gated_bias = nn.Parameter(torch.zeros(intermediate_size, **factory))
        if non_gated_layer_bias:
            self.non_gated_bias = nn.Parameter(torch.zeros(intermediate_size, **factory))
        self.output = nn.Linear(intermediate_size, hidden_size, **factory)
        self.activation = activation
        self.dropout = dropout
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        gate, value = self.input(hidden_states).chunk(2, dim=-1)
        if self.gated_bias is not None:
            gate = gate + self.gated_bias
        if self.non_gated_bias is not None:
            value = value + self.non_gated_bias
        out = self.dropout(self.output(self.activation(gate) * value))
        return self.LayerNorm(out + input_tensor)


def _activation(
    name: str | None, intermediate: nn.Module
) -> Callable[[torch.Tensor], torch.Tensor]:
    if name is None:  # the model's own (BERT: GELU, so GEGLU)
        return intermediate.intermediate_act_fn
    return ACTIVATIONS[name]


def apply_gated_linear_units(
    model: nn.Module,
    act_fn: str | None = None,
    gated_layer_bias: bool = False,
    non_gated_layer_bias: bool = False,
    intermediate_scale: float = 2 / 3,
) -> int:
    """Replace the feed-forward block of every Hugging Face ``BertLayer`` in ``model`` with a
    :class:`GatedFeedForward`, in place; returns how many were replaced (0 when already done).

    ``act_fn`` names the gate activation (a key of :data:`ACTIVATIONS`; None keeps the
    model's). The hidden width is :func:`glu_intermediate_size` of the old one. Build the
    optimizer afterwards: the old FFN parameters are gone.
    """
    from transformers.models.bert.modeling_bert import BertIntermediate, BertLayer, BertOutput

    if act_fn is not None and act_fn not in ACTIVATIONS:
        raise ValueError(f"act_fn must be one of {', '.join(ACTIVATIONS)} or None, got {act_fn!r}")
    if intermediate_scale <= 0:
        raise ValueError(f"intermediate_scale must be > 0, got {intermediate_scale}")
    replaced = 0
    for layer in list(model.modules()):
        if not isinstance(layer, BertLayer) or not isinstance(layer.intermediate, BertIntermediate):
            continue
        old_in, old_out = layer.intermediate, layer.output
        assert isinstance(old_out, BertOutput)
        config = getattr(layer.attention.self, "config", None)
        std = getattr(config, "initializer_range", 0.02)
        weight = old_in.dense.weight
        block = GatedFeedForward(
            hidden_size=old_out.dense.out_features,
            intermediate_size=glu_intermediate_size(old_in.dense.out_features, intermediate_scale),
            activation=_activation(act_fn, old_in),
            layer_norm=old_out.LayerNorm,
            dropout=old_out.dropout,
            gated_layer_bias=gated_layer_bias,
            non_gated_layer_bias=non_gated_layer_bias,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():  # BERT's own initialisation
            for linear in (block.input, block.output):
                linear.weight.normal_(0.0, std)
            block.output.bias.zero_()
        layer.intermediate = nn.Identity()
        layer.output = block
        replaced += 1
    return replaced


class GatedLinearUnits(Algorithm):
    """Replace BERT's feed-forward blocks with gated linear units (GEGLU by default)."""

    name = "gated_linear_units"

    #: Offered to the tuner on/off with its defaults (Shazeer 2020's 2/3 width).
    SEARCH_SPACE = {}

    def __init__(
        self,
        act_fn: str | None = None,
        gated_layer_bias: bool = False,
        non_gated_layer_bias: bool = False,
        intermediate_scale: float = 2 / 3,
    ) -> None:
        if act_fn is not None and act_fn not in ACTIVATIONS:
            raise ValueError(
                f"gated_linear_units.act_fn must be one of {', '.join(ACTIVATIONS)} or None "
                f"(the model's own), got {act_fn!r}"
            )
        if isinstance(intermediate_scale, bool) or not intermediate_scale > 0:
            raise ValueError(
                f"gated_linear_units.intermediate_scale must be > 0, got {intermediate_scale}"
            )
        self.act_fn = act_fn
        self.gated_layer_bias = gated_layer_bias
        self.non_gated_layer_bias = non_gated_layer_bias
        self.intermediate_scale = intermediate_scale
        #: Feed-forward blocks replaced at INIT.
        self.replaced = 0

    def declare(self) -> Declaration:
        # Its place in the one total order of INIT surgery (_init_order): after the activation
        # swap, whose activation it inherits; before the LayerNorm surgery, which then sees
        # every LayerNorm, whichever module holds it.
        return init_surgery("gated_linear_units", reads=(), model_kinds={"bert"})

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.replaced = apply_gated_linear_units(
            state.model,
            self.act_fn,
            self.gated_layer_bias,
            self.non_gated_layer_bias,
            self.intermediate_scale,
        )
        if self.replaced == 0 and not _already_gated(state.model):
            raise ValueError("gated_linear_units: the model has no Hugging Face BertLayer")
        logger.log_metrics({"gated_linear_units/replaced": float(self.replaced)})


def _already_gated(model: nn.Module) -> bool:
    return any(isinstance(m, GatedFeedForward) for m in model.modules())
