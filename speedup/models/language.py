"""Hugging Face language models (BERT, GPT-2) behind the :class:`Model` interface.

:class:`HFModel` (defined in the core, :mod:`speedup.model`, re-exported here) adapts any
``transformers`` model: ``forward`` calls it *without* labels and returns the logits, and the
loss is computed there, so that an algorithm acting at BEFORE_LOSS can still rewrite
``batch["labels"]``. Builders make the networks from ``BertConfig`` /
``GPT2Config`` with random weights and the data's vocabulary (``DataInfo.num_classes`` is the
vocab size for text data), or load a checkpoint from a local directory; nothing downloads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from speedup.errors import ConfigError, DataPathError
from speedup.model import HFModel
from speedup.models.registry import MODELS

__all__ = ["HFModel", "bert", "gpt2", "BERT_SIZES", "GPT2_SIZES"]


#: BERT-Base: 12 layers, hidden 768, 12 heads, FFN 3072, ~110M parameters with the 30,522
#: WordPiece vocab (Devlin et al. 2019, section 3). "tiny" is CPU-test scale.
BERT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 512,
    },
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
}
#: GPT-2 small: 12 layers, width 768, 12 heads, 124M parameters with the 50,257 BPE vocab
#: (Radford et al. 2019, table 2 lists it as 117M; 124M is the released checkpoint's count).
GPT2_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_embd": 128, "n_layer": 2, "n_head": 4},
    "base": {"n_embd": 768, "n_layer": 12, "n_head": 12},
}
#: Dropout when the recipe does not set one: none for CPU-scale runs, the papers' 0.1 at base.
_DEFAULT_DROPOUT = {"tiny": 0.0, "base": 0.1}
_DEFAULT_POSITIONS = {"bert": 512, "gpt2": 1024}


# -- builders ---------------------------------------------------------------------------------


def _choice(value: str, allowed: Any, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"model.{key}: {value!r} is not allowed; allowed: {', '.join(allowed)}")


def _positions(info: Any, requested: int | None, family: str, size: str) -> int:
    seq_len = info.tokens_per_sample or (info.input_shape[0] if info.input_shape else None)
    if requested is None:
        default = seq_len if size == "tiny" and seq_len else _DEFAULT_POSITIONS[family]
        return max(default, seq_len or 0)
    if seq_len and requested < seq_len:
        raise ConfigError(
            f"model.max_position_embeddings: {requested} is shorter than the data's sequence "
            f"length {seq_len}; set it to at least {seq_len} (or leave it unset)"
        )
    return requested


def _vocab(info: Any, task: str, vocab_size: int | None, multiple: int) -> int:
    vocab = (
        vocab_size
        if vocab_size is not None
        else (info.num_classes if task != "classification" else None)
    )
    if vocab is None:
        raise ConfigError(
            "model.vocab_size: needed for classification from scratch (the data's num_classes "
            "counts labels there); set it to the tokenizer's vocab size, or set model.pretrained"
        )
    if multiple < 1:
        raise ConfigError(f"model.vocab_multiple: must be >= 1, got {multiple}")
    # Rounding the embedding up (e.g. 50257 -> 50304 with 64) speeds matmuls on GPUs; the
    # extra rows are never targets.
    return -(-int(vocab) // multiple) * multiple


def _load_pretrained(cls: Any, path: str, example: str, info: Any, task: str) -> nn.Module:
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise DataPathError(
            f"model.pretrained: {path!r} is not a Hugging Face checkpoint directory (no "
            f"config.json there); weights are never downloaded at run time. On a machine with "
            f"network run `{cls.__name__}.from_pretrained({example!r}).save_pretrained({path!r})` "
            "(from transformers), copy the directory (config.json + model.safetensors) here, or "
            "remove model.pretrained to start from random weights"
        )
    net = cls.from_pretrained(str(directory), local_files_only=True)
    vocab = net.get_input_embeddings().weight.shape[0]
    if task != "classification" and info.num_classes and vocab < info.num_classes:
        raise ConfigError(
            f"model.pretrained: {path!r} has {vocab} token embeddings but the data's tokenizer "
            f"has {info.num_classes} tokens; use the checkpoint's own tokenizer directory as "
            "data.tokenizer"
        )
    positions = getattr(net.config, "n_positions", None) or net.config.max_position_embeddings
    seq_len = info.tokens_per_sample
    if seq_len and positions < seq_len:
        raise ConfigError(
            f"model.pretrained: {path!r} has {positions} positions, fewer than the data's "
            f"seq_len {seq_len}; lower data.seq_len"
        )
    return net


@MODELS.register("bert", kind="bert")
def bert(
    info: Any,
    task: str = "mlm",
    size: str = "tiny",
    num_labels: int = 2,
    max_position_embeddings: int | None = None,
    pretrained: str | None = None,
    dropout: float | None = None,
    vocab_size: int | None = None,
    vocab_multiple: int = 1,
) -> HFModel:
    """BERT (Devlin et al. 2019) for masked LM (``task: mlm``) or ``classification``.

    ``size``: ``tiny`` (2 layers, 128 wide; CPU tests) or ``base`` (12 layers, 768 wide, 12
    heads, FFN 3072: BERT-Base, ~110M parameters). The vocabulary is the data's
    (``info.num_classes``) unless ``vocab_size`` is set (needed for classification from
    scratch). ``pretrained`` is a local checkpoint directory; ``dropout`` defaults to 0 for
    tiny and 0.1 for base; ``vocab_multiple`` rounds the embedding up for GPU efficiency.
    """
    _choice(task, ("mlm", "classification"), "task")
    _choice(size, BERT_SIZES, "size")
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    cls = BertForMaskedLM if task == "mlm" else BertForSequenceClassification
    if pretrained is not None:
        net = _load_pretrained(cls, pretrained, "bert-base-uncased", info, task)
        return HFModel(net, task, kind="bert")
    p = _DEFAULT_DROPOUT[size] if dropout is None else dropout
    config = BertConfig(
        vocab_size=_vocab(info, task, vocab_size, vocab_multiple),
        max_position_embeddings=_positions(info, max_position_embeddings, "bert", size),
        hidden_dropout_prob=p,
        attention_probs_dropout_prob=p,
        num_labels=num_labels,
        **BERT_SIZES[size],
    )
    return HFModel(cls(config), task, kind="bert")


@MODELS.register("gpt2", kind="gpt2")
def gpt2(
    info: Any,
    size: str = "tiny",
    max_position_embeddings: int | None = None,
    pretrained: str | None = None,
    dropout: float | None = None,
    vocab_multiple: int = 1,
) -> HFModel:
    """GPT-2 (Radford et al. 2019), a causal LM over the data's vocabulary.

    ``size``: ``tiny`` (2 layers, 128 wide, 4 heads; CPU tests) or ``base`` (GPT-2 small:
    12 layers, 768 wide, 12 heads, 124M parameters with the 50,257-token vocab).
    ``max_position_embeddings`` (GPT-2's ``n_positions``) must cover the sequence length;
    ``pretrained`` is a local checkpoint directory; ``dropout`` defaults to 0 for tiny and
    0.1 for base; ``vocab_multiple`` rounds the embedding up (64: 50257 -> 50304).
    """
    _choice(size, GPT2_SIZES, "size")
    from transformers import GPT2Config, GPT2LMHeadModel

    if pretrained is not None:
        net = _load_pretrained(GPT2LMHeadModel, pretrained, "gpt2", info, "clm")
        return HFModel(net, "clm", kind="gpt2")
    p = _DEFAULT_DROPOUT[size] if dropout is None else dropout
    config = GPT2Config(
        vocab_size=_vocab(info, "clm", None, vocab_multiple),
        n_positions=_positions(info, max_position_embeddings, "gpt2", size),
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=p,
        bos_token_id=None,  # GPT-2's 50256 lies outside a small vocab; training never uses it
        eos_token_id=None,
        **GPT2_SIZES[size],
    )
    return HFModel(GPT2LMHeadModel(config), "clm", kind="gpt2")
