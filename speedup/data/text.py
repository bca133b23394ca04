"""Text corpora for language models: read, tokenise, pack into fixed-length blocks.

Two registered datasets share one code path:

* ``text``: a Hugging Face hub dataset (``allenai/c4`` + subset ``en``, ``wikitext`` +
  ``wikitext-103-raw-v1``) or local ``.txt`` / ``.jsonl`` / ``.json(.gz)`` / ``.parquet``
  files, read through ``datasets.load_dataset`` in streaming mode (the ``text``, ``json`` and
  ``parquet`` builders for local files), so a token cap stops the reading early;
* ``stdlib_text``: the embedded corpus, the running interpreter's own standard-library
  ``.py`` files, read directly from disk (one file = one document; no ``datasets`` needed).

Pipeline: documents -> tokenizer (a byte-level BPE trained here on the training text with
``tokenizers``, or a Hugging Face tokenizer from a local directory) -> each document's ids
followed by one separator (EOS, else SEP) -> concatenated in document order, truncated to
the token cap -> cut into ``seq_len`` blocks (the tail shorter than a block is dropped).
The flat token streams are cached on disk (``$SPEEDUP_CACHE`` or ``~/.cache/speedup``)
under a hash of the settings and of the source files' sizes and mtimes; packing, the
objective and masking are applied after loading, so clm and mlm runs share one cache file.

Batches follow the Hugging Face convention ``{"input_ids", "attention_mask", "labels"}``.
For ``clm`` the labels are the inputs (the model shifts them); for ``mlm`` the training
batches are masked on the fly by :func:`mlm_mask` (Devlin et al. 2019, section 3.1) from
torch's global RNG, and the eval split is masked once with a fixed-seed generator.

No downloads happen without a network: a hub name is preceded by a 3-second TCP probe of
``huggingface.co:443``, and a tokenizer must be ``bpe`` or a local directory.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
import socket
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speedup.data.loaders import DataInfo, DataSplits
from speedup.data.registry import DATASETS
from speedup.errors import ConfigError, DataPathError

__all__ = [
    "BPE_SPECIAL_TOKENS",
    "TextTokenizer",
    "hub_reachable",
    "load_token_streams",
    "mlm_mask",
    "pack_blocks",
    "stdlib_files",
    "stdlib_text",
    "text",
]

_VERSION = 1  # bump when tokenisation or packing changes: invalidates caches
#: Probed before a hub dataset is loaded; tests point it at a closed port.
HUB_ADDRESS: tuple[str, int] = ("huggingface.co", 443)
PROBE_TIMEOUT_S = 3.0
#: Special tokens of the locally trained BPE, in id order. ``<pad>`` is id 0 because BERT's
#: word embedding freezes row ``pad_token_id`` (0 by default); packed blocks never pad.
BPE_SPECIAL_TOKENS = ("<pad>", "<|endoftext|>", "<mask>")
_EVAL_MASK_SEED = 20190524  # fixed: the eval split's masking is part of the data
_SUFFIXES = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}
_OBJECTIVES = ("clm", "mlm")
_SAMPLE_BY = ("paragraph", "line", "document")


# -- masking and packing ----------------------------------------------------------------------


def mlm_mask(
    input_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Iterable[int] = (),
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption (Devlin et al. 2019, section 3.1): returns ``(ids, labels)``.

    Each non-special token is selected with ``probability``; a selected token becomes
    ``mask_token_id`` with probability 0.8, a uniformly random token id with 0.1, and stays
    unchanged with 0.1. ``labels`` holds the original id at selected positions and -100
    elsewhere. Randomness comes from ``generator`` (torch's global RNG when None); the input
    is not modified.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"mlm probability must be in [0, 1], got {probability}")
    ids = input_ids.long()
    chance = torch.full(ids.shape, float(probability))
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    if special.numel():
        chance.masked_fill_(torch.isin(ids, special), 0.0)
    selected = torch.bernoulli(chance, generator=generator).bool()
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    corrupted = torch.where(selected & (roll < 0.8), torch.full_like(ids, mask_token_id), ids)
    corrupted = torch.where(selected & (roll >= 0.8) & (roll < 0.9), random_ids, corrupted)
    return corrupted, labels


def pack_blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[N]`` token stream -> ``[N // seq_len, seq_len]`` blocks (a view; the tail is dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    blocks = stream.numel() // seq_len
    return stream[: blocks * seq_len].view(blocks, seq_len)


class _ToLong:
    """Batch transform: ids stored as int32 (half the memory) become int64 for the model."""

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.long() for k, v in batch.items()}


@dataclass
class _MaskBatch:
    """Training transform for mlm: fresh BERT masking per batch from torch's global RNG."""

    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    probability: float

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, labels = mlm_mask(
            batch["input_ids"],
            self.mask_token_id,
            self.vocab_size,
            self.special_ids,
            self.probability,
        )
        return {
            "input_ids": ids,
            "attention_mask": batch["attention_mask"].long(),
            "labels": labels,
        }


# -- tokenizers -------------------------------------------------------------------------------


@dataclass
class TextTokenizer:
    """The few things the pipeline needs from a tokenizer, whichever kind it is."""

    encode_batch: Callable[[list[str]], list[list[int]]]
    vocab_size: int
    sep_id: int  # appended after every document: EOS if the tokenizer has one, else SEP
    mask_id: int  # -1 when the tokenizer has no mask token (then mlm is impossible)
    special_ids: tuple[int, ...]
    serialized: str = ""  # the BPE's JSON, kept in the cache so a cache hit is self-contained


def _bpe_from_json(serialized: str) -> TextTokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(serialized)
    ids = [tok.token_to_id(t) for t in BPE_SPECIAL_TOKENS]

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    return TextTokenizer(encode, tok.get_vocab_size(), ids[1], ids[2], tuple(ids), serialized)


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """A byte-level BPE (GPT-2's pre-tokenisation) trained on ``texts``; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(BPE_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(BPE_SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return _bpe_from_json(tok.to_str())


def _local_tokenizer(directory: Path) -> TextTokenizer:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    backend = getattr(hf, "backend_tokenizer", None)

    def encode(texts: list[str]) -> list[list[int]]:
        if backend is not None:  # the Rust tokenizer: batched, parallel, no length warnings
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return hf(texts, add_special_tokens=False)["input_ids"]

    sep = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    if sep is None:
        raise ValueError(
            f"data.tokenizer: {str(directory)!r} defines neither an EOS nor a SEP token; one "
            "is needed to separate packed documents"
        )
    mask = hf.mask_token_id if hf.mask_token_id is not None else -1
    return TextTokenizer(encode, len(hf), int(sep), int(mask), tuple(hf.all_special_ids))


def _check_tokenizer_spec(spec: str) -> Path | None:
    """None for ``bpe``; the directory otherwise. Never downloads: a hub name fails here."""
    if spec == "bpe":
        return None
    directory = Path(spec).expanduser()
    if directory.is_dir():
        return directory
    name = Path(spec).name or "tokenizer"
    raise DataPathError(
        f"data.tokenizer: {spec!r} is neither 'bpe' nor an existing local directory, and "
        "tokenizers are never downloaded at run time. On a machine with network run "
        f"`AutoTokenizer.from_pretrained({name!r}).save_pretrained('data/tokenizers/{name}')` "
        f"(from transformers), copy that directory here and set data.tokenizer to it, or use "
        "data.tokenizer=bpe to train a BPE on the training text"
    )


# -- reading documents ------------------------------------------------------------------------


def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    return None


def _looks_like_path(source: str) -> bool:
    """A missing path (an error) rather than a hub name such as ``allenai/c4``."""
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or _suffix_kind(Path(source)) is not None
    )


def _local_files(source: str, what: str = "data.source") -> list[Path] | None:
    """The files a local source names (sorted), or None when it is a hub name."""
    expanded = os.path.expanduser(source)
    path = Path(expanded)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix_kind(p))
    elif path.is_file():
        files = [path]
    elif any(c in source for c in "*?["):
        matches = glob.glob(expanded, recursive=True)
        files = sorted(Path(p) for p in matches if Path(p).is_file() and _suffix_kind(Path(p)))
    elif _looks_like_path(source):
        raise DataPathError(
            f"{what}: {source!r} does not exist; put .txt, .jsonl, .json(.gz) or .parquet "
            "files there (e.g. C4's c4-train.*.json.gz shards), or name a hub dataset"
        )
    else:
        return None
    if not files:
        raise DataPathError(
            f"{what}: {source!r} holds no .txt, .jsonl, .json(.gz) or .parquet files; "
            f"put the corpus there"
        )
    kinds = {_suffix_kind(p) for p in files}
    if None in kinds or len(kinds) > 1:
        raise DataPathError(
            f"{what}: {source!r} mixes file kinds ({', '.join(sorted(map(str, kinds)))}); "
            "point it at files of one kind (.txt, .json/.jsonl(.gz) or .parquet)"
        )
    return [p.resolve() for p in files]


def _file_stamp(files: Iterable[Path]) -> list[tuple[str, int, int]]:
    stamps = []
    for f in files:
        st = f.stat()
        stamps.append((str(f), st.st_size, st.st_mtime_ns))
    return stamps


def _local_documents(files: list[Path], text_field: str, sample_by: str) -> Iterator[str]:
    """Documents from local files through ``datasets``' text/json/parquet builders."""
    from datasets import load_dataset

    builder = _suffix_kind(files[0])
    options: dict[str, Any] = {"sample_by": sample_by} if builder == "text" else {}
    field = "text" if builder == "text" else text_field
    stream = load_dataset(
        builder, data_files=[str(f) for f in files], split="train", streaming=True, **options
    )
    for row in stream:
        if field not in row:
            raise DataPathError(
                f"data.text_field: {field!r} is not a field of the records in "
                f"{str(files[0].parent)!r}; fields: {', '.join(row)}"
            )
        text = row[field]
        if builder == "text":
            text = text.strip("\n")  # paragraphs keep their indentation, lose blank lines
        if text:
            yield text


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds."""
    try:
        with socket.create_connection(HUB_ADDRESS, timeout=timeout):
            return True
    except OSError:
        return False


def _offline_mode() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _no_network_error(source: str, subset: str | None, detail: str) -> DataPathError:
    slug = source.split("/")[-1]
    named = f"{source!r}" + (f" (subset {subset!r})" if subset else "")
    return DataPathError(
        f"data.source: cannot load hub dataset {named}: {detail}. No path {source!r} exists "
        f"locally either. Download the dataset elsewhere and point data.source at local files, "
        f"e.g. put C4's en/c4-train.*.json.gz shards in data/{slug}/train/ and "
        f"c4-validation.*.json.gz in data/{slug}/validation/, then set "
        f"data.source=data/{slug}/train and data.eval_source=data/{slug}/validation"
    )


def _hub_documents(source: str, subset: str | None, split: str, text_field: str) -> Iterator[str]:
    """Documents of a hub dataset's split, streamed. Fails in seconds when offline."""
    offline = _offline_mode()
    if not offline and not hub_reachable():
        raise _no_network_error(
            source, subset, f"no network ({HUB_ADDRESS[0]}:{HUB_ADDRESS[1]} unreachable)"
        )
    from datasets import load_dataset

    try:
        stream = load_dataset(source, subset, split=split, streaming=True)
    except Exception as err:  # noqa: BLE001 - any loading failure is reported the same way
        if offline:
            raise _no_network_error(source, subset, f"offline mode and not cached ({err})") from err
        raise
    for row in stream:
        if text_field not in row:
            raise DataPathError(
                f"data.text_field: {text_field!r} is not a field of {source!r}; "
                f"fields: {', '.join(row)}"
            )
        if row[text_field]:
            yield row[text_field]


def _every_nth(fraction: float) -> Callable[[int], bool]:
    """Document i goes to eval when floor((i+1)*f) > floor(i*f): every 1/f-th document."""
    return lambda i: math.floor((i + 1) * fraction) > math.floor(i * fraction)


# -- tokenising with a cap, with a disk cache -------------------------------------------------


def default_cache_dir() -> Path:
    """``$SPEEDUP_CACHE`` if set, else ``~/.cache/speedup`` (as for MNIST-1D)."""
    from speedup.data.cache import default_cache_dir as cache_dir

    return cache_dir()


def _batched_by_chars(docs: Iterator[str], budget: Callable[[], int]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= budget() or len(batch) >= 1024:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_capped(tok: TextTokenizer, docs: Iterable[str], cap: int | None) -> torch.Tensor:
    """Each document's ids then the separator, concatenated, truncated to ``cap`` tokens."""
    pieces: list[torch.Tensor] = []
    total = 0

    def budget() -> int:  # ~4 characters per token: tokenise little beyond the cap
        return 1_000_000 if cap is None else max(20_000, min(1_000_000, 4 * (cap - total)))

    for batch in _batched_by_chars(iter(docs), budget):
        flat: list[int] = []
        for ids in tok.encode_batch(batch):
            flat.extend(ids)
            flat.append(tok.sep_id)
        if cap is not None and total + len(flat) > cap:
            del flat[cap - total :]  # trim before concatenating: no second copy of the stream
        pieces.append(torch.tensor(flat, dtype=torch.int32))  # one tensor per batch of docs
        total += len(flat)
        if cap is not None and total >= cap:
            break
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)


def load_token_streams(
    settings: dict[str, Any],
    train_docs: Callable[[], Iterator[str]],
    eval_docs: Callable[[], Iterator[str]] | None,
    tokenizer_dir: Path | None,
    vocab_size: int,
    max_train_tokens: int | None,
    max_eval_tokens: int | None,
    cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, TextTokenizer]:
    """Flat int32 token streams ``(train, eval)`` and the tokenizer, cached under a hash.

    ``settings`` must identify the source (names, file stamps); the tokenizer, vocab and caps
    are added here. With ``tokenizer_dir`` None a BPE of ``vocab_size`` is trained on the
    first training documents (about 4 characters per capped token; all of them uncapped).
    """
    key_data = {
        **settings,
        "version": _VERSION,
        "tokenizer": "bpe"
        if tokenizer_dir is None
        else _file_stamp(sorted(tokenizer_dir.iterdir())),
        "vocab_size": vocab_size if tokenizer_dir is None else None,
        "max_train_tokens": max_train_tokens,
        "max_eval_tokens": max_eval_tokens,
    }
    described = json.dumps(key_data, sort_keys=True, default=str)
    key = hashlib.sha256(described.encode()).hexdigest()[:16]
    path = default_cache_dir() / f"text-{key}.pt"
    if cache and path.is_file():
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            meta = loaded["meta"]
            if tokenizer_dir is None:
                tok = _bpe_from_json(meta["tokenizer"])
            else:
                tok = _local_tokenizer(tokenizer_dir)
            return loaded["train"], loaded["eval"], tok
        except Exception:  # noqa: BLE001 - a corrupt or foreign file: rebuild and overwrite
            pass

    docs = train_docs()
    if tokenizer_dir is None:
        head: list[str] = []
        chars, wanted = 0, (None if max_train_tokens is None else 4 * max_train_tokens)
        for doc in docs:
            head.append(doc)
            chars += len(doc)
            if wanted is not None and chars >= wanted:
                break
        if not head:
            raise DataPathError(f"data.source: no training text found in {settings['source']}")
        tok = train_bpe(head, vocab_size)
        docs = itertools.chain(head, docs)
    else:
        tok = _local_tokenizer(tokenizer_dir)
    train = _encode_capped(tok, docs, max_train_tokens)
    evaluation = (
        _encode_capped(tok, eval_docs(), max_eval_tokens)
        if eval_docs is not None
        else torch.zeros(0, dtype=torch.int32)
    )
    if cache:
        from speedup.data.cache import save_to_cache

        meta = {
            "tokenizer": tok.serialized,
            "vocab_size": tok.vocab_size,
            "settings": described,
        }
        save_to_cache({"train": train, "eval": evaluation, "meta": meta}, path)  # type: ignore[arg-type]
    return train, evaluation, tok


# -- from streams to DataSplits ---------------------------------------------------------------


def _check_common(objective: str, seq_len: int, mlm_probability: float) -> None:
    if objective not in _OBJECTIVES:
        raise ConfigError(
            f"data.objective: {objective!r} is not allowed; allowed: {', '.join(_OBJECTIVES)}"
        )
    if seq_len < 2:
        raise ConfigError(f"data.seq_len: must be >= 2, got {seq_len}")
    if not 0.0 < mlm_probability < 1.0:
        raise ConfigError(f"data.mlm_probability: must be in (0, 1), got {mlm_probability}")


def _split_dict(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    # attention_mask is all ones (packed blocks never pad): a stride-0 view costs no memory.
    ones = torch.ones(1, 1, dtype=torch.int8).expand(blocks.shape[0], blocks.shape[1])
    return {"input_ids": blocks, "attention_mask": ones, "labels": blocks}


def build_splits(
    train_stream: torch.Tensor,
    eval_stream: torch.Tensor,
    tok: TextTokenizer,
    seq_len: int,
    objective: str,
    mlm_probability: float,
    eval_mlm_probability: float | None = None,
    eval_expected: bool = True,
) -> DataSplits:
    """Pack the streams into blocks and attach the objective's labels and transforms."""
    train_blocks = pack_blocks(train_stream, seq_len)
    if train_blocks.shape[0] == 0:
        raise ConfigError(
            f"data: only {train_stream.numel()} training tokens, fewer than one block of "
            f"seq_len={seq_len}; raise data.max_train_tokens or lower data.seq_len"
        )
    eval_blocks = pack_blocks(eval_stream, seq_len)
    train = _split_dict(train_blocks)
    evaluation = _split_dict(eval_blocks) if eval_blocks.shape[0] else None
    if evaluation is None and eval_expected:
        warnings.warn(f"text data: fewer than {seq_len} eval tokens; no eval split", stacklevel=3)
    # DataInfo has no vocab field: for language data num_classes is the vocab size, i.e. the
    # number of output classes of the LM head.
    info = DataInfo(
        kind="text", input_shape=(seq_len,), num_classes=tok.vocab_size, tokens_per_sample=seq_len
    )
    if objective == "clm":
        return DataSplits(train, evaluation, info, _ToLong(), _ToLong())
    if tok.mask_id < 0:
        raise ConfigError("data.objective: mlm needs a tokenizer with a mask token; it has none")
    masker = _MaskBatch(tok.mask_id, tok.vocab_size, tok.special_ids, float(mlm_probability))
    if evaluation is not None:
        generator = torch.Generator().manual_seed(_EVAL_MASK_SEED)
        prob = mlm_probability if eval_mlm_probability is None else eval_mlm_probability
        ids, labels = mlm_mask(
            eval_blocks, tok.mask_id, tok.vocab_size, tok.special_ids, prob, generator
        )
        evaluation = {
            "input_ids": ids.to(torch.int32),
            "attention_mask": evaluation["attention_mask"],
            "labels": labels.to(torch.int32),
        }
    return DataSplits(train, evaluation, info, masker, _ToLong())


# -- the registered datasets ------------------------------------------------------------------


@DATASETS.register("text", kind="text")
def text(
    source: str,
    subset: str | None = None,
    text_field: str = "text",
    split_train: str = "train",
    split_eval: str | None = "validation",
    eval_source: str | None = None,
    eval_fraction: float = 0.05,
    sample_by: str = "paragraph",
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    seq_len: int = 128,
    objective: str = "clm",
    max_train_tokens: int | None = None,
    max_eval_tokens: int | None = 100_000,
    mlm_probability: float = 0.15,
    eval_mlm_probability: float | None = None,
    cache: bool = True,
) -> DataSplits:
    """A text corpus from the Hugging Face hub or local files, packed for clm or mlm.

    ``source`` is a hub dataset name (``allenai/c4`` with ``subset: en``; ``wikitext`` with
    ``subset: wikitext-103-raw-v1``), read from ``split_train`` / ``split_eval``; or a local
    file, directory or glob of ``.txt`` (split into documents by ``sample_by``: paragraph,
    line or document), ``.jsonl`` / ``.json(.gz)`` or ``.parquet`` files (the ``text_field``
    of each record is a document). Local eval text comes from ``eval_source`` when given,
    else every 1/``eval_fraction``-th document (0 disables eval). ``tokenizer`` is ``bpe``
    (a byte-level BPE of ``vocab_size`` trained on the training text) or a local directory
    holding a Hugging Face tokenizer. ``max_train_tokens`` / ``max_eval_tokens`` cap the
    tokens read (None: all; set it for streamed hub corpora such as C4).
    ``eval_mlm_probability`` (default: ``mlm_probability``) masks the eval split, e.g. 0.15
    while training at 0.3 as in MosaicBERT.
    """
    _check_common(objective, seq_len, mlm_probability)
    if sample_by not in _SAMPLE_BY:
        raise ConfigError(
            f"data.sample_by: {sample_by!r} is not allowed; allowed: {', '.join(_SAMPLE_BY)}"
        )
    tokenizer_dir = _check_tokenizer_spec(tokenizer)
    files = _local_files(source)
    eval_files = _local_files(eval_source, "data.eval_source") if eval_source else None
    if eval_source and eval_files is None:
        raise DataPathError(f"data.eval_source: {eval_source!r} is not an existing local path")

    settings: dict[str, Any] = {"text_field": text_field}
    train_docs: Callable[[], Iterator[str]]
    eval_docs: Callable[[], Iterator[str]] | None
    if files is None:  # a hub dataset
        settings.update(source=source, subset=subset, splits=[split_train, split_eval])
        train_docs = lambda: _hub_documents(source, subset, split_train, text_field)  # noqa: E731
        eval_docs = (
            (lambda: _hub_documents(source, subset, split_eval, text_field)) if split_eval else None
        )
    else:
        settings.update(source=_file_stamp(files), sample_by=sample_by)

        def all_docs() -> Iterator[str]:
            return _local_documents(files, text_field, sample_by)

        if eval_files is not None:
            settings["eval_source"] = _file_stamp(eval_files)
            train_docs = all_docs
            eval_docs = lambda: _local_documents(eval_files, text_field, sample_by)  # noqa: E731
        elif eval_fraction > 0:
            settings["eval_fraction"] = eval_fraction
            is_eval = _every_nth(eval_fraction)
            train_docs = lambda: (d for i, d in enumerate(all_docs()) if not is_eval(i))  # noqa: E731
            eval_docs = lambda: (d for i, d in enumerate(all_docs()) if is_eval(i))  # noqa: E731
        else:
            train_docs, eval_docs = all_docs, None
    train, evaluation, tok = load_token_streams(
        settings, train_docs, eval_docs, tokenizer_dir, vocab_size,
        max_train_tokens, max_eval_tokens, cache,
    )  # fmt: skip
    return build_splits(
        train,
        evaluation,
        tok,
        seq_len,
        objective,
        mlm_probability,
        eval_mlm_probability,
        eval_expected=eval_docs is not None,
    )


def stdlib_files(include_tests: bool = False) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the standard library's ``.py`` files, sorted by the
    relative path; site-packages and ``__pycache__`` excluded, test suites (directories
    ``test``, ``tests``, ``idle_test``) unless ``include_tests``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        skipped |= {"test", "tests", "idle_test"}
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skipped]
        for name in names:
            if name.endswith(".py"):
                path = Path(directory) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _is_eval_file(relative: str, every: int) -> bool:
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % every == 0


@DATASETS.register("stdlib_text", kind="text")
def stdlib_text(
    seq_len: int = 128,
    objective: str = "clm",
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    max_train_tokens: int | None = 300_000,
    max_eval_tokens: int | None = 30_000,
    mlm_probability: float = 0.15,
    eval_mlm_probability: float | None = None,
    include_tests: bool = False,
    eval_every: int = 20,
    cache: bool = True,
) -> DataSplits:
    """The embedded text corpus: this machine's Python standard library source, packed.

    Each ``.py`` file is one document, read directly from disk in sorted order of its path
    relative to ``sysconfig``'s stdlib directory (site-packages excluded; test suites only
    with ``include_tests``). A file goes to eval when the SHA-1 of its relative path is
    divisible by ``eval_every`` (about 1 in 20, stable as files come and go), so the split
    is disjoint by file. Tokenisation, packing and objectives are those of ``text``; the
    default caps (300k train tokens, vocab 4096) tokenise in a few seconds on 2 cores. The
    corpus depends on the Python version, so results do across versions.
    """
    _check_common(objective, seq_len, mlm_probability)
    if eval_every < 2:
        raise ConfigError(f"data.eval_every: must be >= 2, got {eval_every}")
    tokenizer_dir = _check_tokenizer_spec(tokenizer)
    files = stdlib_files(include_tests)
    if not files:
        raise DataPathError(
            f"stdlib_text: no .py files under {sysconfig.get_paths()['stdlib']!r}; this "
            "Python ships without its standard library source, use the text dataset instead"
        )
    train_files = [p for rel, p in files if not _is_eval_file(rel, eval_every)]
    eval_files = [p for rel, p in files if _is_eval_file(rel, eval_every)]

    def read(paths: list[Path]) -> Iterator[str]:
        for p in paths:
            content = p.read_text(encoding="utf-8", errors="replace")
            if content.strip():
                yield content

    settings = {
        "source": "stdlib",
        "root": sysconfig.get_paths()["stdlib"],
        "files": [(rel, p.stat().st_size, p.stat().st_mtime_ns) for rel, p in files],
        "eval_every": eval_every,
    }
    train, evaluation, tok = load_token_streams(
        settings, lambda: read(train_files), lambda: read(eval_files), tokenizer_dir,
        vocab_size, max_train_tokens, max_eval_tokens, cache,
    )  # fmt: skip
    return build_splits(
        train, evaluation, tok, seq_len, objective, mlm_probability, eval_mlm_probability
    )
