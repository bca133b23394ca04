"""Rotary position embeddings (RoPE) instead of learned absolute positions.

**What.** Su et al. (2021, "RoFormer: enhanced transformer with rotary position embedding",
arXiv 2104.09864, section 3.2, computed in the element-wise form of section 3.4.2) encode
position ``m`` by rotating each pair of dimensions ``(x_2i, x_2i+1)`` of a query or key by
the angle ``m theta_i``, with ``theta_i = base^(-2i/d)``, ``i = 0 .. d/2 - 1``, ``d`` the head
dimension and ``base`` 10000.
Values are not rotated. Since rotations compose, ``<R(m) q, R(n) k> = <q, R(n - m) k>``: the
attention score depends on the positions only through the offset ``n - m`` (section 3.2).
The learned absolute position table is removed (its contribution is zero): position enters
through the rotation alone, as in the modded-nanogpt speedrun's architecture, which has no
``wpe``.

Surgery at INIT on Hugging Face GPT-2 and BERT: the position embedding module becomes
:class:`RotaryPositions`, which returns zeros (so nothing is added to the token embeddings)
and records the position ids the model computed for this forward, with their cosines and
sines; a forward hook on each self-attention's query/key projections (shared with
``qk_norm``, which runs first) rotates the projected heads. Because the model computes the
position ids itself, they are right for cached decoding (the new tokens' ids continue after
the cache), for explicit ``position_ids`` and for left-padded generation; the cache holds
rotated keys, as in every RoPE implementation. Nothing is learned and the frequencies follow
from ``base`` and the head size, so there is nothing to checkpoint and a resumed run rebuilds
them exactly. Works with every attention implementation (eager, SDPA, flash): the attention
kernels see ordinary queries and keys.

``pairing: interleaved`` is the paper's layout (dimension ``2i`` with ``2i + 1``);
``pairing: half`` pairs dimension ``i`` with ``i + d/2`` (GPT-NeoX, LLaMA, modded-nanogpt's
ModernArch): the same function up to a fixed permutation of the head dimensions, but weights
do not transfer between the two. ``fraction`` < 1 rotates only the first
``fraction * head_dim`` dimensions (rounded down to even) and leaves the rest position-free,
as GPT-NeoX's ``rotary_pct`` does; modded-nanogpt record #17 goes further in the same
direction, rotating half the dimensions at tuned frequencies.

**When it helps.** Language-model pretraining: RoFormer's pre-training experiments (section
4) report faster convergence than BERT's learned absolute positions, and rotary embeddings
are the position encoding of GPT-NeoX, LLaMA and the modded-nanogpt speedrun's architecture
("ModernArch"); a relative encoding lets a model attend by offset rather than learn every
absolute position separately. It adds a small per-step cost (a
rotation of each query and key) and removes the ``max_positions x width`` table from the
optimizer. Measured here (benchmarks/suites/stdlib-gpt-speedrun.yaml: the 2-layer GPT-2 on the
stdlib corpus, 64-token blocks, 120 steps, 2 seeds), alone: 22.7 steps to eval loss 6.4
against the baseline's 72.8, at a per-step cost of 1.14x on the CPU, 2.83x [1.61, 4.42] in
calibrated time; a short run gains much from not having to learn a position table.

**Composes badly with.** ALiBi: another relative position scheme (an additive bias), declared
incompatible. Fine-tuning a checkpoint trained with absolute positions (its position table is
discarded). Exporting with ``save_pretrained``: transformers' own GPT-2 and BERT have no RoPE,
so a reloaded copy has fresh position embeddings and no rotation; call :func:`apply_rotary`
after loading. Sequences longer than the model's position table are refused by the model as
before (rotary does not extrapolate by itself).

Functional twins: :func:`rotary_frequencies`, :func:`rotate`, :func:`apply_rotary`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from speedup.algorithms._init_order import init_surgery
from speedup.algorithms.qk_norm import add_qk_transform, self_attention_modules
from torch import nn

from speedup.algorithm import Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "PAIRINGS",
    "Rotary",
    "RotaryPositions",
    "apply_rotary",
    "rotary_dims",
    "rotary_frequencies",
    "rotate",
]

PAIRINGS = ("interleaved", "half")


def rotary_dims(head_dim: int, fraction: float = 1.0) -> int:
    """How many leading dimensions of a head are rotated: ``fraction * head_dim`` rounded
    down to an even number."""
    return int(head_dim * fraction) // 2 * 2


def rotary_frequencies(
    head_dim: int, base: float = 10000.0, fraction: float = 1.0, device: torch.device | None = None
) -> torch.Tensor:
    """``theta_i = base^(-2i/r)`` for ``i = 0 .. r/2 - 1`` (float32 ``[r/2]``), with ``r`` the
    rotated dimensions (:func:`rotary_dims`); RoFormer's eq. 15 with ``d = r``."""
    rotated = rotary_dims(head_dim, fraction)
    exponents = torch.arange(0, rotated, 2, dtype=torch.float64, device=device) / rotated
    return (float(base) ** -exponents).to(torch.float32)


def rotate(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pairing: str = "interleaved",
) -> torch.Tensor:
    """Rotate the leading ``2 * cos.shape[-1]`` dimensions of ``x`` (``[..., T, heads, d]``)
    pairwise by the angles whose cosines and sines are given (broadcastable to
    ``[..., T, 1, r/2]``); the other dimensions pass unchanged. Computed in float32 and
    returned in ``x``'s dtype.

    For a pair ``(a, b)`` at angle ``phi``: ``(a cos phi - b sin phi, a sin phi + b cos
    phi)``. ``pairing`` picks the pairs: ``interleaved`` ``(x_2i, x_2i+1)``, ``half``
    ``(x_i, x_i+r/2)``.
    """
    rotated = 2 * cos.shape[-1]
    part, rest = x[..., :rotated].float(), x[..., rotated:]
    if pairing == "interleaved":
        a, b = part[..., 0::2], part[..., 1::2]
    elif pairing == "half":
        a, b = part[..., : rotated // 2], part[..., rotated // 2 :]
    else:
        raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    first, second = a * cos - b * sin, a * sin + b * cos
    if pairing == "interleaved":
        turned = torch.stack((first, second), dim=-1).flatten(-2)
    else:
        turned = torch.cat((first, second), dim=-1)
    return torch.cat((turned.to(x.dtype), rest), dim=-1)


class RotaryPositions(nn.Module):
    """Stands in for a position embedding table: returns zeros of the width (no absolute
    position is added) and keeps the position ids of the current forward, with the cosines
    and sines of their rotation angles (``[B, T, 1, r/2]``), for the attention layers."""

    def __init__(self, embedding_dim: int, head_dim: int, base: float, fraction: float) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.head_dim = head_dim
        self.base = base
        self.fraction = fraction
        # Empty, but it follows model.to(device, dtype), so the zeros match the model.
        self.register_buffer("anchor", torch.zeros(0), persistent=False)
        self.position_ids: torch.Tensor | None = None
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        theta = rotary_frequencies(self.head_dim, self.base, self.fraction, position_ids.device)
        angles = position_ids.to(torch.float32)[..., None] * theta  # [B, T, r/2]
        self.position_ids = position_ids
        self.cos, self.sin = angles.cos()[..., None, :], angles.sin()[..., None, :]
        zero = torch.zeros((), dtype=self.anchor.dtype, device=position_ids.device)
        return zero.expand(*position_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (
            f"{self.embedding_dim}, head_dim={self.head_dim}, base={self.base}, "
            f"fraction={self.fraction}"
        )


class _Rotate:
    """The query/key transform: rotate by the positions of the current forward."""

    def __init__(self, positions: RotaryPositions, pairing: str) -> None:
        self.positions = positions
        self.pairing = pairing

    def __call__(self, x: torch.Tensor, role: str) -> torch.Tensor:
        cos, sin = self.positions.cos, self.positions.sin
        if cos is None or cos.shape[-3] != x.shape[-3]:
            found = "none" if cos is None else f"{cos.shape[-3]} positions"
            raise RuntimeError(
                f"rotary: the attention got {x.shape[-3]} tokens but the model's positions of "
                f"this forward are {found}; call the whole model (GPT2Model/BertModel), whose "
                "embeddings compute the positions, not an attention layer alone"
            )
        return rotate(x, cos, sin, self.pairing)


def _check(base: float, fraction: float, pairing: str, prefix: str = "") -> None:
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
        raise ValueError(f"{prefix}base must be a number > 1, got {base!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"{prefix}fraction must be a number in (0, 1], got {fraction!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"{prefix}fraction must be in (0, 1], got {fraction!r}")
    if pairing not in PAIRINGS:
        raise ValueError(f"{prefix}pairing must be one of {', '.join(PAIRINGS)}, got {pairing!r}")


def apply_rotary(
    model: nn.Module, base: float = 10000.0, fraction: float = 1.0, pairing: str = "interleaved"
) -> int:
    """Turn the Hugging Face GPT-2 and BERT networks inside ``model`` into rotary models, in
    place; returns the number of self-attention modules that now rotate (0 when already done).

    Position embeddings become :class:`RotaryPositions` (their parameters leave the model:
    build the optimizer afterwards) and each self-attention module rotates its projected
    queries and keys by the positions of the forward.
    """
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model

    _check(base, fraction, pairing)
    changed = 0
    for network in [m for m in model.modules() if isinstance(m, (GPT2Model, BertModel))]:
        attentions = self_attention_modules(network)
        if not attentions:
            continue
        head_dim = int(
            getattr(attentions[0], "head_dim", None) or attentions[0].attention_head_size
        )
        if rotary_dims(head_dim, fraction) == 0:
            raise ValueError(
                f"rotary: fraction={fraction} of the head size {head_dim} rotates no dimension "
                f"pair; use a fraction >= {2 / head_dim:.3g}"
            )
        if isinstance(network, GPT2Model):
            owner, attribute = network, "wpe"
        else:
            owner = next(m for m in network.modules() if isinstance(m, BertEmbeddings))
            attribute = "position_embeddings"
            kind = getattr(owner, "position_embedding_type", "absolute")
            if kind != "absolute":  # before transformers 5: relative types skip the table
                raise ValueError(
                    f"rotary: BERT with position_embedding_type={kind!r} has no absolute "
                    "position table to replace; build it with 'absolute'"
                )
        positions = getattr(owner, attribute)
        if not isinstance(positions, RotaryPositions):
            positions = RotaryPositions(positions.embedding_dim, head_dim, base, fraction)
            setattr(owner, attribute, positions)
        for attention in attentions:
            changed += add_qk_transform(attention, "rotary", _Rotate(positions, pairing))
    return changed


def _rotary(model: nn.Module) -> bool:
    return any(isinstance(m, RotaryPositions) for m in model.modules())


class Rotary(Algorithm):
    """Replace learned absolute positions with rotary embeddings of queries and keys."""

    name = "rotary"

    #: Tuner choice: the rotated fraction of each head (1.0: RoFormer; 0.5: partial rotary).
    SEARCH_SPACE = {"fraction": {"type": "categorical", "choices": [0.5, 1.0]}}

    def __init__(
        self, base: float = 10000.0, fraction: float = 1.0, pairing: str = "interleaved"
    ) -> None:
        _check(base, fraction, pairing, prefix="rotary.")
        self.base = base
        self.fraction = fraction
        self.pairing = pairing
        #: Self-attention modules rotating at INIT.
        self.patched = 0

    def declare(self) -> Declaration:
        return init_surgery(
            "rotary",
            reads=(),
            incompatible_with={"alibi"},  # ordered anyway, so that is the only conflict
            model_kinds={"gpt2", "bert"},
            data_kinds={"text"},
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.patched = apply_rotary(state.model, self.base, self.fraction, self.pairing)
        if self.patched == 0 and not _rotary(state.model):
            raise ValueError(
                "rotary: found no Hugging Face GPT-2 or BERT self-attention in the model "
                "(it applies to transformers' GPT2Model and BertModel)"
            )
        logger.log_metrics({"rotary/attention_modules": float(self.patched)})
