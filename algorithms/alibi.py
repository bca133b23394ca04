"""ALiBi: attention with linear biases instead of position embeddings.

**What.** Removes the learned position embeddings and adds to every attention score a
penalty linear in the distance between query ``i`` and key ``j``: head ``h`` (1-based) of
``n`` adds ``-m_h * |i - j|`` before the softmax (Press, Smith & Lewis 2022, "Train short,
test long: attention with linear biases enables input length extrapolation", ICLR, section 3
and figure 3). The slopes are fixed, the geometric sequence ``m_h = 2^(-8h/n)``: 1/2, 1/4,
..., 1/256 for 8 heads. For a head count that is not a power of two, the paper's reference
implementation takes the slopes of the closest lower power of two ``p`` and adds every other
slope of the ``2p`` sequence (:func:`alibi_slopes`). GPT-2 is causal, so only ``j <= i``
count and the bias is ``-m_h (i - j)``; BERT attends both ways and uses the symmetric
``|i - j|`` (Composer's and MosaicBERT's choice for bidirectional encoders).

Surgery at INIT, on Hugging Face BERT and GPT-2: the position embedding modules become a
parameter-free zero (their ``max_positions x hidden`` weights leave the model and the
optimizer), and each self-attention module gets a forward pre-hook that adds the bias to the
attention mask it receives, so the model's own ``eager`` or ``sdpa`` attention applies it
(``flash_attention_*`` takes no additive bias and is refused). Packed batches without padding
share one ``[1, heads, L, L]`` bias across the layers of a forward; with padding the bias and
the padding mask combine into one ``[N, heads, L, L]`` tensor per layer. Nothing is learned:
the slopes follow from the head count, so a resumed run rebuilds them exactly.

**Train short, test long.** ``train_sequence_length_scaling`` cuts every training batch
``[N, L]`` into ``[N / s, s L]`` (consecutive segments; all tokens kept) after the dataloader;
evaluation keeps the full length, which ALiBi extrapolates to. ``max_sequence_length`` grows
BERT's position-id buffers (GPT-2 without a position table takes any length).

**When it helps.** Causal LM pretraining where attention cost matters. Press et al.
(abstract) train a 1.3B model on length 1024 that, evaluated at 2048, matches the perplexity
of a sinusoidal-position model trained on 2048, training 11% faster with 11% less memory.
Composer's method card (GPT-2 on OpenWebText, 8xA100, evaluated at 1024 tokens, trained at
``train_sequence_length_scaling=0.25``: its default here, with ``max_sequence_length=8192``)
reports GPT-2 52M/83M/125M at 1.16x/1.18x/1.19x speed-up and perplexity -0.24/-0.38/-0.63,
with 1.16-1.28x less GPU memory; it warns that training at 128 tokens or fewer degrades
quality. MosaicBERT (Portes et al. 2023) uses ALiBi in its BERT-Base recipe (79.6 GLUE in
1.13 h on 8xA100) but trains at the full length 128 (scaling 1.0).

**Composes badly with.** Fine-tuning a pretrained checkpoint: the learned positions are
discarded, so expect to retrain. Sequence classification with a scaling below 1 (a label per
sequence cannot be cut into segments: use 1.0). SeqLengthWarmup runs after the reshape and
ramps up to the shortened length. Flash attention kernels (no additive bias) and any other
surgery on the attention modules. Exporting with ``save_pretrained``: transformers' own BERT
and GPT-2 have no ALiBi, so a reloaded copy gets fresh position embeddings and no bias; call
:func:`apply_alibi` after loading. ``train_sequence_length_scaling`` below 1 multiplies the
rows of each batch, so a ``microbatch_size`` counts the shorter rows.

**transformers versions.** Tested with 4.40 (the floor in ``pyproject.toml``), 4.41, 4.47,
4.50, 4.53, 4.57, 5.0 and 5.25. Across them the attention implementation is a class fixed when
the model is built (GPT-2 up to 4.47, BERT up to 4.57) or the config read at each call; the
KV cache is a ``(key, value)`` tuple or a ``Cache`` object, passed as ``layer_past``,
``past_key_value``, ``past_key_values`` or (5.x) ``cache``; eager GPT-2 (up to 5.0 at
least) slices its causal mask from an ``n_positions``-square table, which the hook grows
for longer inputs. SDPA exists for BERT from 4.41 and GPT-2 from 4.47 at the latest (4.40
has eager only); the tests skip what the installed release lacks.

Functional twins: :func:`apply_alibi`, :func:`alibi_slopes`, :func:`alibi_bias`.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import weakref
from typing import TYPE_CHECKING

import torch
from speedup.algorithms._init_order import init_neighbours
from speedup.algorithms.qk_norm import self_attention_modules
from speedup.algorithms.seq_length_warmup import set_batch_sequence_length
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["Alibi", "NoPositionEmbedding", "alibi_bias", "alibi_slopes", "apply_alibi"]

#: Attention implementations that add a float mask to the scores (so the bias rides on it).
SUPPORTED_ATTENTION = ("eager", "sdpa")


def _masked_value(dtype: torch.dtype) -> float:
    """The fill for masked scores: finite in ``dtype`` and in bf16 (autocast may cast the mask
    down), so a fully masked row softmaxes to a uniform row rather than NaN, as with Hugging
    Face's finite-minimum masks."""
    return max(torch.finfo(torch.bfloat16).min, torch.finfo(dtype).min)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The heads' slopes ``m_h`` (float32 ``[num_heads]``), steepest first.

    A power of two ``n`` gives ``2^(-8h/n)`` for ``h = 1..n``. Otherwise the ``p`` slopes of
    the largest power of two ``p < n`` come first, then every other slope of the ``2p``
    sequence (its 1st, 3rd, ...) until there are ``n``: the rule of Press et al.'s code, which
    keeps the slopes of the ``p`` heads and interleaves the new ones between them.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(lower)
    if lower < num_heads:
        slopes += power_of_two(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(
    slopes: torch.Tensor, query_length: int, key_length: int | None = None, offset: int = 0
) -> torch.Tensor:
    """``-m_h * |i - j|`` as float32 ``[heads, query_length, key_length]``.

    Query ``i`` sits at position ``offset + i`` (cached decoding), key ``j`` at ``j``. For a
    causal model only ``j <= offset + i`` is ever attended, where this is ``-m_h (i - j)``.
    """
    key_length = offset + query_length if key_length is None else key_length
    device = slopes.device
    queries = torch.arange(offset, offset + query_length, device=device)
    keys = torch.arange(key_length, device=device)
    distance = (queries[:, None] - keys[None, :]).abs().to(torch.float32)
    return -slopes.to(torch.float32)[:, None, None] * distance


class NoPositionEmbedding(nn.Module):
    """Stands in for a position embedding table: zeros of the width, for any position."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        # Empty, but it follows model.to(device, dtype), so the zeros match the model.
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.anchor.dtype, device=position_ids.device)
        return zero.expand(*position_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.embedding_dim}"


@functools.cache
def _parameters(cls: type) -> tuple[str, ...]:
    """The forward's parameter names after ``self``: where positional arguments land."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]


@functools.cache
def _class_implementation(cls: type) -> str | None:
    """The implementation a class computes where transformers picks one subclass per
    implementation as the model is built (``GPT2_ATTENTION_CLASSES`` in 4.40-4.47,
    ``BERT_SELF_ATTENTION_CLASSES`` in 4.41-4.57 among the releases tested); None where one
    class dispatches on its config at call time."""
    for name, table in vars(sys.modules[cls.__module__]).items():
        if name.endswith("_ATTENTION_CLASSES") and isinstance(table, dict):
            for implementation, member in table.items():
                if member is cls:
                    return implementation
    return None


def _implementation(module: nn.Module) -> str:
    """The attention implementation ``module`` actually computes.

    Where the class was chosen at build time, the class decides (the config may have been
    edited since); otherwise the module's config, read at each call. BERT's self-attention
    has no ``config`` before transformers 5; there, without a table (4.40) it is eager.
    """
    implementation = _class_implementation(type(module))
    if implementation is not None:
        return implementation
    config = getattr(module, "config", None)
    return "eager" if config is None else config._attn_implementation


def _is_causal(module: nn.Module) -> bool:
    """Whether ``module`` masks the keys after each query (GPT-2; BERT as a decoder)."""
    causal = getattr(module, "is_causal", None)  # GPT-2; BERT from transformers 5
    if causal is None:
        causal = getattr(module, "is_decoder", False)  # BERT in transformers 4
    return bool(causal)


def _past_length(module: nn.Module, call: dict) -> int:
    """How many keys the module has cached from earlier forwards (0 without a cache).

    The cache's argument has been renamed across transformers releases (``layer_past``,
    ``past_key_value``, ``past_key_values``, ``cache``), so a ``Cache`` object is found by
    what it is, not by its name. Legacy caches (GPT-2 in 4.40-4.47, for one) are a
    ``(key, value)`` pair of ``[N, heads, past, head_dim]`` tensors.
    """
    for value in call.values():
        if hasattr(value, "get_seq_length"):  # a transformers Cache
            cache = getattr(value, "self_attention_cache", value)  # EncoderDecoderCache
            return int(cache.get_seq_length(getattr(module, "layer_idx", None) or 0))
    for name in ("layer_past", "past_key_value", "past_key_values"):
        legacy = call.get(name)
        if isinstance(legacy, (tuple, list)) and legacy and torch.is_tensor(legacy[0]):
            return int(legacy[0].shape[-2])
    return 0


def _grow_causal_table(module: nn.Module, length: int) -> None:
    """Grow the ``[1, 1, n, n]`` causal table that eager GPT-2 slices its mask from.

    Eager GPT-2 in transformers 4.40 to 5.0 (at least) slices ``module.bias[..., :kv]``, sized
    by ``n_positions`` at build time, so an input longer than the position table (which ALiBi
    makes possible) would not fit. The table doubles (amortized while decoding one token at a
    time) and costs what building the model with that ``n_positions`` would have.
    """
    table = module._buffers.get("bias")
    if table is None or table.dtype != torch.bool or table.shape[-1] >= length:
        return
    size = max(length, 2 * table.shape[-1])
    full = torch.ones(size, size, dtype=torch.bool, device=table.device)
    module.bias = torch.tril(full).view(1, 1, size, size)


class _AddAlibiBias:
    """A forward pre-hook on self-attention modules: adds the ALiBi bias to their mask.

    The slopes follow from the module's head count (``alibi_heads``), so there is no state
    to go stale. One instance serves every patched module of a model, and the layers of one
    forward share the bias it builds rather than each saving a copy for backward (SDPA's
    kernels save their mask). Inside a forward of the enclosing ``GPT2Model``/``BertModel``
    (:meth:`enter`/:meth:`leave` hooks) it holds that bias; some transformers releases (4.50
    to 4.57) hand SDPA a slice of it, which would otherwise drop the last reference. Outside
    one (a bare encoder) a weak reference lets autograd's copy serve. Once the forward is
    over, nothing is cached.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._bias: weakref.ref | None = None
        self._held: torch.Tensor | None = None
        self._depth = 0

    def enter(self, module: nn.Module, args: tuple) -> None:
        self._depth += 1

    def leave(self, module: nn.Module, args: tuple, output: object) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._held = None

    def bias(
        self, heads: int, q: int, kv: int, offset: int, causal: bool, like: torch.Tensor
    ) -> torch.Tensor:
        """``[1, heads, q, kv]`` on ``like``'s device, in ``like``'s dtype (computed in fp32);
        ``causal`` masks the keys after each query."""
        key = (heads, q, kv, offset, causal, like.device, like.dtype)
        bias = self._bias() if self._bias is not None and key == self._key else None
        if bias is None:
            bias = alibi_bias(alibi_slopes(heads).to(like.device), q, kv, offset)
            if causal:
                queries = torch.arange(offset, offset + q, device=like.device)
                future = torch.arange(kv, device=like.device)[None, :] > queries[:, None]
                bias = bias.masked_fill(future, _masked_value(like.dtype))
            bias = bias[None].to(like.dtype)
            self._key, self._bias = key, weakref.ref(bias)
        self._held = bias if self._depth > 0 else None
        return bias

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        implementation = _implementation(module)
        if implementation not in SUPPORTED_ATTENTION:
            raise RuntimeError(
                f"alibi: attention implementation {implementation!r} cannot add a bias; use "
                f"one of {', '.join(SUPPORTED_ATTENTION)}"
            )
        names = _parameters(type(module))
        call = {**dict(zip(names, args)), **kwargs}
        hidden, mask = call["hidden_states"], call.get("attention_mask")
        # Cached decoding: the new queries sit after the cached keys.
        offset = _past_length(module, call)
        q = hidden.shape[1]
        kv = mask.shape[-1] if mask is not None else offset + q
        if implementation == "eager":
            _grow_causal_table(module, kv)
        heads = module.alibi_heads
        # The mask's dtype: fp32 under autocast (SDPA casts it itself), else the model's.
        if torch.is_autocast_enabled(hidden.device.type):
            like = hidden.new_empty((), dtype=torch.float32)
        else:
            like = hidden.new_empty(())
        if mask is None:  # no padding: add the causal mask the model would have implied
            mask = self.bias(heads, q, kv, offset, _is_causal(module), like)
        elif mask.dtype == torch.bool:  # sdpa with padding: True attends
            bias = self.bias(heads, q, kv, offset, False, like)
            mask = bias.masked_fill(~mask, _masked_value(bias.dtype))
        else:  # an additive float mask already, in the model's dtype (eager; 4.x sdpa)
            mask = mask + self.bias(heads, q, kv, offset, False, mask)
        index = names.index("attention_mask")
        if "attention_mask" in kwargs or len(args) <= index:
            kwargs["attention_mask"] = mask
        else:
            args = (*args[:index], mask, *args[index + 1 :])
        return args, kwargs


def _grow_bert_positions(embeddings: nn.Module, length: int) -> None:
    """Regrow BERT's position-id and token-type buffers so inputs up to ``length`` fit."""
    current = embeddings.position_ids.shape[-1]
    if length > current:
        device = embeddings.position_ids.device
        embeddings.position_ids = torch.arange(length, device=device).expand(1, -1)
        embeddings.token_type_ids = torch.zeros(1, length, dtype=torch.long, device=device)


def apply_alibi(model: nn.Module, max_sequence_length: int | None = None) -> int:
    """Turn the Hugging Face BERT and GPT-2 networks inside ``model`` into ALiBi models, in
    place; returns the number of self-attention modules that now add the bias.

    Position embeddings become :class:`NoPositionEmbedding` (their parameters leave the
    model: build the optimizer afterwards); every self-attention module is marked with its
    head count (``alibi_heads``) and gets a forward pre-hook that adds the bias to the mask
    it is called with. ``max_sequence_length`` (when larger than the model's) grows BERT's
    position-id buffers and is written to the configs. Applying it twice changes nothing
    more.
    """
    from transformers.models.bert.modeling_bert import (
        BertEmbeddings,
        BertModel,
    )
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model

    if max_sequence_length is not None and max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
    hook = _AddAlibiBias()
    attention = 0
    modules = list(model.modules())
    # Cross-attention is left alone: queries and keys come from different sequences there.
    self_attention = {id(m) for m in self_attention_modules(model)}
    for module in modules:
        if isinstance(module, BertEmbeddings):
            if not isinstance(module.position_embeddings, NoPositionEmbedding):
                width = module.position_embeddings.embedding_dim
                module.position_embeddings = NoPositionEmbedding(width)
            if max_sequence_length is not None:
                _grow_bert_positions(module, max_sequence_length)
        elif isinstance(module, GPT2Model):
            if not isinstance(module.wpe, NoPositionEmbedding):
                module.wpe = NoPositionEmbedding(module.wpe.embedding_dim)
        if isinstance(module, (BertModel, GPT2Model)) and not hasattr(module, "alibi_scope"):
            # The span of one forward, over which the layers share one bias.
            module.alibi_scope = hook
            module.register_forward_pre_hook(hook.enter)
            module.register_forward_hook(hook.leave, always_call=True)
        if id(module) not in self_attention:
            continue
        attention += 1
        implementation = _implementation(module)
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"alibi: the model uses attention implementation {implementation!r}, which "
                f"cannot add a bias; build it with attn_implementation one of "
                f"{', '.join(SUPPORTED_ATTENTION)}"
            )
        if not hasattr(module, "alibi_heads"):  # not patched by an earlier call
            module.alibi_heads = getattr(module, "num_attention_heads", None) or module.num_heads
            module.register_forward_pre_hook(hook, with_kwargs=True)
    if attention and max_sequence_length is not None:
        # The models' configs (BERT's attention modules hold none before transformers 5).
        for module in modules:
            config = getattr(module, "config", None)
            if getattr(config, "model_type", None) in ("bert", "gpt2"):
                current = config.max_position_embeddings
                config.max_position_embeddings = max(current, max_sequence_length)
    if attention == 0:
        raise ValueError(
            "alibi: found no Hugging Face BERT or GPT-2 self-attention in the model "
            "(it applies to transformers' BertSelfAttention and GPT2Attention)"
        )
    return attention


class Alibi(Algorithm):
    """Replace position embeddings with ALiBi attention biases; train on shorter sequences.

    ``max_sequence_length`` is the longest input the model accepts afterwards (BERT's
    position-id buffers grow to it; GPT-2 has no limit left). ``train_sequence_length_scaling``
    in (0, 1] reshapes training batches to that fraction of their length (1.0: unchanged).
    """

    name = "alibi"

    #: Offered to the tuner on/off with its defaults.
    SEARCH_SPACE = {}

    def __init__(
        self, max_sequence_length: int = 8192, train_sequence_length_scaling: float = 0.25
    ) -> None:
        if isinstance(max_sequence_length, bool) or max_sequence_length < 1:
            raise ValueError(f"alibi.max_sequence_length must be >= 1, got {max_sequence_length}")
        if not 0.0 < train_sequence_length_scaling <= 1.0:
            raise ValueError(
                "alibi.train_sequence_length_scaling must be in (0, 1], got "
                f"{train_sequence_length_scaling}"
            )
        self.max_sequence_length = max_sequence_length
        self.train_sequence_length_scaling = train_sequence_length_scaling
        #: Self-attention modules patched at INIT (0 before).
        self.patched = 0

    def declare(self) -> Declaration:
        events = {Event.INIT: Access(writes={"model.modules"})}
        if self.train_sequence_length_scaling < 1.0:
            events[Event.AFTER_DATALOADER] = Access(reads={"batch"}, writes={"batch"})
        return Declaration(
            events=events,
            # Surgery order at INIT: first in the one total order (_init_order), so ALiBi
            # patches HF attention modules before the FFN and LayerNorm swaps; the warmup
            # ramps up to the reshaped length.
            runs_before={*init_neighbours("alibi")["runs_before"], "seq_length_warmup"},
            model_kinds={"bert", "gpt2"},
            data_kinds={"text"},
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.patched = apply_alibi(state.model, self.max_sequence_length)
            logger.log_metrics({"alibi/attention_modules": float(self.patched)})
            return
        batch = state.batch
        full = batch["input_ids"].shape[1]
        length = max(1, int(full * self.train_sequence_length_scaling))
        try:
            state.batch = set_batch_sequence_length(batch, length, truncate=False)
        except ValueError as err:
            raise ValueError(
                f"alibi.train_sequence_length_scaling={self.train_sequence_length_scaling} "
                f"reshapes training batches: {err}; set it to 1.0 for this data"
            ) from None
