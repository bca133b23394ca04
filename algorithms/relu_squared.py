"""Squared ReLU in the feed-forward blocks of GPT-2 and BERT.

**What.** Replaces the activation of every transformer feed-forward block ``W2 act(x W1)``
with the squared ReLU, ``act(x) = max(x, 0)^2`` (So et al. 2021, "Primer: searching for
efficient transformers for language modeling", NeurIPS; the abstract names it as one of the
two simple modifications to which Primer's improvements can mostly be attributed, the other
being depthwise convolutions after the Q, K and V projections, not done here). Surgery at
INIT on Hugging Face models: GPT-2's ``GPT2MLP.act`` and BERT's
``BertIntermediate.intermediate_act_fn`` become a :class:`ReLUSquaredActivation` module; no
weight changes and nothing is learned, so nothing is checkpointed beyond the model. GPT-2's
config is set to transformers' own name for the same function (``activation_function:
relu2``), so a GPT-2 saved with ``save_pretrained`` reloads with it; BERT's ``hidden_act``
also sets the masked-LM head's activation, so it is left alone and a reloaded BERT needs
:func:`apply_relu_squared` again.

**When it helps.** Language-model pretraining from scratch. Primer's abstract reports, at
500M parameters on C4 autoregressive language modelling, a 4x lower training cost than the
original T5 architecture, and at 1.9B parameters (a GPT-3 XL-like configuration) 1/3 of the
training compute of a Transformer for the same one-shot performance; the gains grow with
compute scale. In the modded-nanogpt speedrun it replaced GELU in record #5 (bundled with
QK-norm, zero-initialised projections and padded embeddings: 22.3 -> 15.2 min), and the
ModernArch notes put it at about 1-2% better than GELU. No extra compute: it costs what the
GELU it replaces costs. At CPU scale it helps a little, not significantly: alone on
benchmarks/suites/stdlib-gpt-speedrun.yaml (2-layer GPT-2, 2 seeds) 54.2 steps to eval loss
6.4 against the baseline's 72.8, a calibrated 1.39x with a 95% interval [0.79, 2.19].

**Composes badly with.** Fine-tuning a pretrained GELU checkpoint (the weights were trained
for another nonlinearity). Low precision: activations grow quadratically, so fp16 may
overflow where bf16 and fp32 do not. ``gated_linear_units`` runs after it (declared), and a
GLU without its own ``act_fn`` gates with the model's activation, which is then ReLU^2
("ReGLU^2"); Composer's GLU card found GELU or ReLU gates better than squared ReLU, so set
``gated_linear_units.act_fn`` when combining them.

Functional twins: :func:`relu_squared`, :func:`apply_relu_squared`.
"""

from __future__ import annotations

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

__all__ = ["ReLUSquared", "ReLUSquaredActivation", "apply_relu_squared", "relu_squared"]

#: transformers' registry name (ACT2FN) for the same activation, written into the configs.
HF_NAME = "relu2"


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """``max(x, 0)^2``, elementwise (Primer's squared ReLU)."""
    return F.relu(x).square()


class ReLUSquaredActivation(nn.Module):
    """The squared ReLU as a module, to stand in for an activation module or function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_squared(x)


def apply_relu_squared(model: nn.Module) -> int:
    """Make every Hugging Face GPT-2 MLP and BERT intermediate block in ``model`` use the
    squared ReLU, in place; returns how many blocks changed (0 when already done).

    GPT-2 configs' ``activation_function`` becomes ``relu2``, so that a saved and reloaded
    GPT-2 computes the same function (BERT's ``hidden_act`` is left alone: it also sets the
    prediction head's activation, which stays GELU).
    """
    from transformers.models.bert.modeling_bert import BertIntermediate
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    changed = 0
    for module in model.modules():
        if isinstance(module, GPT2MLP) and not isinstance(module.act, ReLUSquaredActivation):
            module.act = ReLUSquaredActivation()
            changed += 1
        elif isinstance(module, BertIntermediate) and not isinstance(
            module.intermediate_act_fn, ReLUSquaredActivation
        ):
            module.intermediate_act_fn = ReLUSquaredActivation()
            changed += 1
    if changed:
        for module in model.modules():
            config = getattr(module, "config", None)
            if getattr(config, "model_type", None) == "gpt2":  # used by GPT2MLP only
                config.activation_function = HF_NAME
    return changed


def _has_relu_squared(model: nn.Module) -> bool:
    return any(isinstance(m, ReLUSquaredActivation) for m in model.modules())


class ReLUSquared(Algorithm):
    """Use the squared ReLU, max(x, 0)^2, in the feed-forward blocks of GPT-2 and BERT."""

    name = "relu_squared"

    #: Offered to the tuner on/off (it has no arguments).
    SEARCH_SPACE = {}

    def __init__(self) -> None:
        #: Feed-forward blocks changed at INIT.
        self.replaced = 0

    def declare(self) -> Declaration:
        return init_surgery("relu_squared", reads=(), model_kinds={"gpt2", "bert"})

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.replaced = apply_relu_squared(state.model)
        if self.replaced == 0 and not _has_relu_squared(state.model):
            raise ValueError(
                "relu_squared: found no Hugging Face GPT2MLP or BertIntermediate in the model"
            )
        logger.log_metrics({"relu_squared/replaced": float(self.replaced)})
