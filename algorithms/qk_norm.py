"""QK-norm: normalised queries and keys in every self-attention layer.

**What.** Each attention head's query and key vectors are normalised over the head dimension
before their dot product, so attention logits stay bounded whatever the scale of the
activations. Dehghani et al. (2023, "Scaling vision transformers to 22 billion parameters",
ICML, section 2 "QK normalization") apply LayerNorm to queries and keys after their
projections, ``softmax(LN(X W_Q) LN(X W_K)^T / sqrt(d))``: without it their 8B-parameter
model's attention logits grew without bound, the softmax went one-hot and training diverged.
Wortsman et al. (2023, "Small-scale proxies for large-scale Transformer training
instabilities", arXiv 2309.14322, section 3.1) reproduce that instability in small models at high
learning rates and show qk-layernorm removes it and flattens the loss against the learning
rate. The modded-nanogpt speedrun (record #5) uses the parameter-free form: an RMS norm with
no gain, ``x / sqrt(mean(x^2) + eps)``, which is this algorithm's default (``norm: rms``);
``norm: layernorm`` is Dehghani et al.'s LayerNorm, with a learned gain and bias per head
dimension (shared by the heads of a layer, separate for queries and keys, initialised to 1
and 0).

A normalised query and key have norm ``sqrt(d)``, so the usual ``1/sqrt(d)`` scale caps each
logit at ``sqrt(d)`` in size; the speedrun found that this keeps attention too diffuse and
replaced the scale with a fixed ``0.12`` (records/track_1_short/2025-01-16_Sub3Min README: as
good as a learned gain or per-layer scale, 20 steps saved, at no cost). ``scale`` sets that
factor (None keeps the model's own): queries are multiplied by ``scale / model_scale`` after
the norm, which is exact for any attention kernel.

Surgery at INIT on Hugging Face GPT-2 and BERT: a forward hook on each self-attention's
query/key projection (GPT-2's fused ``c_attn``, BERT's ``query`` and ``key``) normalises the
projected heads; the model's own attention (eager, SDPA or flash) then runs unchanged, and a
key cache stores normalised keys. With ``rotary`` on the same model the norm comes first
(applied in that order whichever was installed first), as in the current speedrun; a
gain-free RMS norm commutes with a rotation anyway, a learned gain would not.

**When it helps.** Training at high learning rates or large scale, where attention-logit
growth destabilises training (Dehghani et al.: the 22B model trains stably only with it;
Wortsman et al.: with it, the final loss varies far less with the learning rate).
In the speedrun, record #5 bundled it with ReLU^2, zero-initialised projections and padded
embeddings (22.3 -> 15.2 min on 8xH100); its separate share is not reported. At CPU scale with
a stable learning rate it does little: alone on benchmarks/suites/stdlib-gpt-speedrun.yaml (2
seeds) 64.7 steps to eval loss 6.4 against the baseline's 72.8, a calibrated 1.24x whose 95%
interval [0.61, 2.40] spans no effect.

**Composes badly with.** Fine-tuning a checkpoint trained without it (the attention logits
change scale). Any other surgery that replaces the query/key projections after it
(``factorize`` runs before it: declared). ALiBi composes (its bias is added to the
normalised logits).

Functional twins: :func:`apply_qk_norm`, :func:`rms_norm_heads`; the projection hooks shared
with ``rotary``: :func:`self_attention_modules`, :func:`add_qk_transform`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from speedup.algorithms._init_order import init_surgery
from torch import nn

from speedup.algorithm import Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "NORMS",
    "QKNorm",
    "QKTransforms",
    "add_qk_transform",
    "apply_qk_norm",
    "attention_scale",
    "rms_norm_heads",
    "self_attention_modules",
]

NORMS = ("rms", "layernorm")

#: Where each transform sits in a layer's chain: normalise first, then rotate (modded-nanogpt's
#: current order; a learned norm gain would not commute with the rotation).
ORDER = {"qk_norm": 0, "rotary": 1}

#: A transform of one projection's heads: ``(x [N, T, heads, head_dim], role) -> same shape``
#: with ``role`` "query" or "key".
Transform = Callable[[torch.Tensor, str], torch.Tensor]


def rms_norm_heads(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last (head) dimension, with no gain: the
    parameter-free RMS norm of modded-nanogpt. Computed in float32, returned in ``x``'s
    dtype (the mean of squares loses too much in bf16)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


# -- the shared projection hooks (qk_norm and rotary) -----------------------------------------


@dataclass
class QKTransforms:
    """The transforms applied to one self-attention module's projected queries and keys, in
    :data:`ORDER`. Stored on the module as ``qk_transforms``."""

    heads: int
    head_dim: int
    transforms: list[tuple[int, str, Transform]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [name for _, name, _ in self.transforms]

    def __call__(self, x: torch.Tensor, role: str) -> torch.Tensor:
        """``x`` as the projection returns it, ``[N, T, heads * head_dim]``."""
        if not self.transforms:
            return x
        shape = x.shape
        heads = x.view(*shape[:-1], self.heads, self.head_dim)
        for _, _, transform in self.transforms:
            heads = transform(heads, role)
        # Back to the projection's dtype: under autocast a LayerNorm returns float32.
        return heads.reshape(shape).to(x.dtype)


class _FusedProjectionHook:
    """A forward hook on GPT-2's ``c_attn``, whose output is ``[query | key | value]``."""

    def __init__(self, owner: nn.Module, width: int) -> None:
        self.owner = owner  # the attention module: its ``qk_transforms`` is read at each call
        self.width = width

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        transforms = self.owner.qk_transforms
        query, key, value = output.split(self.width, dim=-1)
        return torch.cat((transforms(query, "query"), transforms(key, "key"), value), dim=-1)


class _ProjectionHook:
    """A forward hook on one of BERT's ``query``/``key`` projections."""

    def __init__(self, owner: nn.Module, role: str) -> None:
        self.owner = owner
        self.role = role

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.owner.qk_transforms(output, self.role)


def self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The Hugging Face GPT-2 and BERT self-attention modules in ``model`` (cross-attention
    excluded: its keys come from another sequence)."""
    from transformers.models.bert.modeling_bert import BertSelfAttention
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    modules = list(model.modules())
    # Before transformers 5, BERT's cross-attention is a BertSelfAttention too (under
    # BertLayer.crossattention.self).
    cross = {
        id(layer.crossattention.self)
        for layer in modules
        if isinstance(getattr(layer, "crossattention", None), nn.Module)
        and isinstance(getattr(layer.crossattention, "self", None), nn.Module)
    }
    found = []
    for module in modules:
        if isinstance(module, GPT2Attention) and not module.is_cross_attention:
            found.append(module)
        elif isinstance(module, BertSelfAttention) and id(module) not in cross:
            found.append(module)
    return found


def _heads(attention: nn.Module) -> tuple[int, int]:
    """(heads, head_dim) of a GPT-2 or BERT attention module, across transformers releases."""
    heads = getattr(attention, "num_heads", None) or attention.num_attention_heads
    head_dim = getattr(attention, "head_dim", None) or attention.attention_head_size
    return int(heads), int(head_dim)


def add_qk_transform(attention: nn.Module, name: str, transform: Transform) -> bool:
    """Apply ``transform`` to the projected queries and keys of ``attention`` (a module of
    :func:`self_attention_modules`) from now on; ``name`` is a key of :data:`ORDER`, which
    fixes its place among the others. Returns False (and changes nothing) when a transform
    of that name is installed already.

    The first call installs forward hooks on the projections: ``c_attn`` for GPT-2 (its
    output split into query, key and value), ``query`` and ``key`` for BERT. The model's
    attention then runs on the transformed heads, with any implementation.
    """
    chain = getattr(attention, "qk_transforms", None)
    if chain is None:
        heads, head_dim = _heads(attention)
        chain = QKTransforms(heads, head_dim)
        attention.qk_transforms = chain
        if hasattr(attention, "c_attn"):  # GPT-2
            width = heads * head_dim
            attention.c_attn.register_forward_hook(_FusedProjectionHook(attention, width))
        else:  # BERT
            attention.query.register_forward_hook(_ProjectionHook(attention, "query"))
            attention.key.register_forward_hook(_ProjectionHook(attention, "key"))
    if name in chain.names():
        return False
    chain.transforms.append((ORDER[name], name, transform))
    chain.transforms.sort(key=lambda item: item[0])
    return True


def attention_scale(attention: nn.Module) -> float:
    """The factor the model multiplies ``q . k`` by in ``attention``: ``1/sqrt(head_dim)``
    unless GPT-2's config turns the scaling off (``scale_attn_weights``) or divides it by the
    layer number (``scale_attn_by_inverse_layer_idx``)."""
    scaling = getattr(attention, "scaling", None)  # transformers >= 5 precomputes it
    if isinstance(scaling, (int, float)):
        return float(scaling)
    _, head_dim = _heads(attention)
    if not hasattr(attention, "c_attn"):  # BERT always scales by 1/sqrt(head size)
        return 1.0 / math.sqrt(head_dim)
    scale = 1.0 / math.sqrt(head_dim) if getattr(attention, "scale_attn_weights", True) else 1.0
    if getattr(attention, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(attention.layer_idx + 1)
    return scale


# -- QK-norm ----------------------------------------------------------------------------------


class _NormalizeHeads:
    """Normalise each head's query or key; multiply queries by ``query_factor``."""

    def __init__(self, owner: nn.Module, norm: str, eps: float, query_factor: float) -> None:
        self.owner = owner
        self.norm = norm
        self.eps = eps
        self.query_factor = query_factor

    def __call__(self, x: torch.Tensor, role: str) -> torch.Tensor:
        if self.norm == "rms":
            x = rms_norm_heads(x, self.eps)
        else:  # the module is looked up at each call: later surgery may replace it
            layer_norm = getattr(self.owner, f"{role}_norm")
            x = layer_norm(x)
        if role == "query" and self.query_factor != 1.0:
            x = x * self.query_factor
        return x


def _check(norm: str, scale: float | None, eps: float, prefix: str = "") -> None:
    if norm not in NORMS:
        raise ValueError(f"{prefix}norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0
    ):
        raise ValueError(f"{prefix}scale must be a number > 0 or null (the model's), got {scale!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{prefix}eps must be a number > 0, got {eps!r}")


def apply_qk_norm(
    model: nn.Module, norm: str = "rms", scale: float | None = None, eps: float = 1e-6
) -> int:
    """Normalise the queries and keys of every Hugging Face GPT-2/BERT self-attention in
    ``model``, in place; returns how many modules were changed (0 when already done).

    ``norm`` is ``rms`` (parameter-free) or ``layernorm`` (a learned gain and bias over the
    head dimension, added to each attention module as ``query_norm`` and ``key_norm``: build
    the optimizer afterwards). ``scale`` replaces the model's ``1/sqrt(head_dim)`` logit
    scale (None keeps it).
    """
    _check(norm, scale, eps)
    changed = 0
    for attention in self_attention_modules(model):
        chain = getattr(attention, "qk_transforms", None)
        if chain is not None and "qk_norm" in chain.names():  # applied before
            continue
        heads, head_dim = _heads(attention)
        if norm == "layernorm":
            weight = next(attention.parameters())
            factory = {"device": weight.device, "dtype": weight.dtype}
            attention.query_norm = nn.LayerNorm(head_dim, eps=eps, **factory)
            attention.key_norm = nn.LayerNorm(head_dim, eps=eps, **factory)
        factor = 1.0 if scale is None else scale / attention_scale(attention)
        changed += add_qk_transform(
            attention, "qk_norm", _NormalizeHeads(attention, norm, eps, factor)
        )
    return changed


def _normalized(model: nn.Module) -> bool:
    return any(
        "qk_norm" in m.qk_transforms.names()
        for m in model.modules()
        if isinstance(getattr(m, "qk_transforms", None), QKTransforms)
    )


class QKNorm(Algorithm):
    """Normalise each head's queries and keys (parameter-free RMS norm by default)."""

    name = "qk_norm"

    #: Offered to the tuner on/off with its defaults (the speedrun's parameter-free RMS norm).
    SEARCH_SPACE = {}

    def __init__(self, norm: str = "rms", scale: float | None = None, eps: float = 1e-6) -> None:
        _check(norm, scale, eps, prefix="qk_norm.")
        self.norm = norm
        self.scale = scale
        self.eps = eps
        #: Self-attention modules changed at INIT.
        self.patched = 0

    def declare(self) -> Declaration:
        return init_surgery("qk_norm", reads=(), model_kinds={"gpt2", "bert"})

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.patched = apply_qk_norm(state.model, self.norm, self.scale, self.eps)
        if self.patched == 0 and not _normalized(state.model):
            raise ValueError(
                "qk_norm: found no Hugging Face GPT-2 or BERT self-attention in the model "
                "(it applies to transformers' GPT2Attention and BertSelfAttention)"
            )
        logger.log_metrics({"qk_norm/attention_modules": float(self.patched)})
