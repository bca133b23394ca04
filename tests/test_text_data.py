"""Text corpora: reading through `datasets`, exact packing, MLM masking, offline failures."""

import gzip
import json
import socket

import pytest
import torch

from speedup.data import DataPathError
from speedup.data import text as T

PARAGRAPHS = [
    "def alpha():\n    return 1",
    "The quick brown fox jumps over the lazy dog.",
    "class Beta:\n    value = 'two'",
    "Packing concatenates documents in order, separated by one token.",
    "import os\nprint(os.getcwd())",
    "Every block holds exactly seq_len tokens; the tail is dropped.",
    "x = [i * i for i in range(10)]",
    "Last paragraph: gamma delta epsilon.",
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDUP_CACHE", str(tmp_path / "cache"))


def expected_stream(tok, docs):
    ids = []
    for doc in docs:
        ids += tok.encode_batch([doc])[0] + [tok.sep_id]
    return torch.tensor(ids, dtype=torch.int32)


def test_txt_paragraphs_are_packed_in_order_with_a_trained_bpe(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n".join(PARAGRAPHS) + "\n")
    splits = T.text(str(source), vocab_size=300, seq_len=8, eval_fraction=0.0, cache=False)
    # The same BPE, trained independently on the same documents (training is deterministic).
    tok = T.train_bpe(PARAGRAPHS, 300)
    stream = expected_stream(tok, PARAGRAPHS)
    blocks = splits.train["input_ids"]
    assert blocks.shape == (stream.numel() // 8, 8)
    assert torch.equal(blocks.flatten(), stream[: blocks.numel()])
    assert torch.equal(splits.train["labels"], blocks)  # clm: the model shifts
    assert splits.train["attention_mask"].all()
    assert splits.eval is None
    assert splits.info.num_classes == tok.vocab_size == 300
    assert splits.info.input_shape == (8,) and splits.info.tokens_per_sample == 8
    batch = splits.train_transform({k: v[:2] for k, v in splits.train.items()})
    assert all(v.dtype == torch.int64 for v in batch.values())


def save_hf_tokenizer(directory, docs):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = T.train_bpe(docs, 320)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(bpe.serialized),
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    hf.save_pretrained(str(directory))
    return bpe


def write_records(path, docs, field="body"):
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({"id": 0, field: doc}) + "\n")


def test_jsonl_split_every_nth_document_with_a_local_tokenizer_directory(tmp_path):
    write_records(tmp_path / "docs.jsonl", PARAGRAPHS)
    bpe = save_hf_tokenizer(tmp_path / "tok", PARAGRAPHS)
    splits = T.text(
        str(tmp_path / "docs.jsonl"),
        text_field="body",
        tokenizer=str(tmp_path / "tok"),
        eval_fraction=0.25,  # documents 3 and 7 of 0..7
        seq_len=4,
    )
    train_docs = [d for i, d in enumerate(PARAGRAPHS) if i not in (3, 7)]
    eval_docs = [PARAGRAPHS[3], PARAGRAPHS[7]]
    for split, docs in ((splits.train, train_docs), (splits.eval, eval_docs)):
        stream = expected_stream(bpe, docs)
        flat = split["input_ids"].flatten()
        assert flat.numel() == stream.numel() // 4 * 4
        assert torch.equal(flat, stream[: flat.numel()])


def test_json_gz_and_parquet_give_the_same_tensors_as_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "a").mkdir()
    write_records(tmp_path / "a" / "docs.jsonl", PARAGRAPHS)
    (tmp_path / "b").mkdir()
    with gzip.open(tmp_path / "b" / "c4-train.00000.json.gz", "wt") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in PARAGRAPHS)
    (tmp_path / "c").mkdir()
    pq.write_table(pa.table({"body": PARAGRAPHS}), tmp_path / "c" / "part-0.parquet")
    results = [
        T.text(
            str(tmp_path / d),
            text_field="body",
            vocab_size=300,
            seq_len=8,
            eval_fraction=0.0,
            cache=False,
        )
        for d in ("a", "b", "c")
    ]
    for other in results[1:]:
        assert torch.equal(other.train["input_ids"], results[0].train["input_ids"])


def test_missing_field_and_missing_paths_say_what_to_put_where(tmp_path):
    write_records(tmp_path / "docs.jsonl", PARAGRAPHS, field="content")
    with pytest.raises(DataPathError, match="'text' is not a field.*content"):
        T.text(str(tmp_path / "docs.jsonl"), cache=False)
    with pytest.raises(DataPathError, match="does not exist; put .txt"):
        T.text(str(tmp_path / "nothing" / "c4.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPathError, match="holds no .txt"):
        T.text(str(tmp_path / "empty"))


@pytest.fixture
def no_network(monkeypatch):
    """Every DNS lookup or connection attempt, recorded and refused."""
    attempts = []

    def lookup(host, *args, **kwargs):
        attempts.append(("getaddrinfo", host))
        raise socket.gaierror("the test allows no network")

    def connect(self, address):
        attempts.append(("connect", address))
        raise OSError("the test allows no network")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def test_a_tokenizer_name_that_is_not_a_directory_fails_before_any_work(
    tmp_path, monkeypatch, no_network
):
    # Fails fast: before the corpus is looked at, a tokenizer loaded or the network touched.
    # The seconds it takes are measured by benchmarks/fail_fast.py.
    (tmp_path / "a.txt").write_text("hello world\n")
    work = []
    for name in ("_local_files", "_local_documents", "_local_tokenizer", "_hub_documents"):
        monkeypatch.setattr(T, name, lambda *args, name=name, **kwargs: work.append(name))
    with pytest.raises(DataPathError, match=r"save_pretrained\('data/tokenizers/gpt2'\)"):
        T.text(str(tmp_path / "a.txt"), tokenizer="gpt2")
    assert work == [] and no_network == []


@pytest.mark.parametrize("address", [("127.0.0.1", 9), None])
def test_a_hub_name_fails_after_one_bounded_probe_when_offline(monkeypatch, address):
    # Fails fast: one connection attempt with a timeout, and datasets (which would retry the
    # hub) is never asked. The seconds it takes are measured by benchmarks/fail_fast.py.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    if address is None:  # the real hub: only meaningful on a machine without network
        if T.hub_reachable():
            pytest.skip("huggingface.co is reachable from here")
    else:
        monkeypatch.setattr(T, "HUB_ADDRESS", address)  # a closed port: refused at once
    probes = []
    connect = socket.create_connection

    def probe(target, timeout=None, *args, **kwargs):
        probes.append((target, timeout))
        return connect(target, timeout, *args, **kwargs)

    def load_dataset(*args, **kwargs):
        pytest.fail("datasets.load_dataset was called for an unreachable hub")

    import datasets

    monkeypatch.setattr(socket, "create_connection", probe)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataPathError) as info:
        T.text("allenai/c4", subset="en", max_train_tokens=1000, cache=False)
    assert probes == [(T.HUB_ADDRESS, T.PROBE_TIMEOUT_S)]
    assert 0 < T.PROBE_TIMEOUT_S <= 5
    message = str(info.value)
    assert "no network" in message and "point data.source at local files" in message
    assert "json.gz" in message and "data/c4/train" in message


def test_mlm_mask_statistics_follow_bert():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (200, 500), generator=g)
    ids[:, ::10] = 1  # separators: special, never selected
    ids[:, 5::10] = 0
    original = ids.clone()
    masked, labels = T.mlm_mask(ids, 2, 1000, special_ids=(0, 1, 2), probability=0.15)
    assert torch.equal(ids, original)  # the input is not modified
    special = (ids == 0) | (ids == 1)
    selected = labels != -100
    assert not selected[special].any()
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    rate = selected[~special].float().mean().item()
    assert abs(rate - 0.15) < 0.005
    n = selected.sum().item()
    to_mask = (masked[selected] == 2).sum().item() / n
    unchanged = (masked[selected] == ids[selected]).sum().item() / n
    randomised = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.01
    assert abs(randomised - 0.1) < 0.01  # a random draw equal to the original counts as kept
    assert abs(unchanged - 0.1) < 0.01


def test_mlm_mask_uses_the_generator_or_the_global_rng():
    ids = torch.randint(3, 100, (8, 64))
    a = T.mlm_mask(ids, 2, 100, (0, 1, 2), 0.3, torch.Generator().manual_seed(5))
    b = T.mlm_mask(ids, 2, 100, (0, 1, 2), 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(1)
    c = T.mlm_mask(ids, 2, 100, (0, 1, 2), 0.3)
    torch.manual_seed(1)
    d = T.mlm_mask(ids, 2, 100, (0, 1, 2), 0.3)
    e = T.mlm_mask(ids, 2, 100, (0, 1, 2), 0.3)
    assert torch.equal(c[1], d[1]) and not torch.equal(d[1], e[1])


SMALL = {"seq_len": 32, "vocab_size": 400, "max_train_tokens": 8000, "max_eval_tokens": 2000}


def test_stdlib_mlm_eval_is_masked_once_deterministically_and_train_per_batch():
    first = T.stdlib_text(objective="mlm", cache=False, **SMALL)
    second = T.stdlib_text(objective="mlm", cache=False, **SMALL)
    assert torch.equal(first.eval["input_ids"], second.eval["input_ids"])
    assert torch.equal(first.eval["labels"], second.eval["labels"])
    rate = (first.eval["labels"] != -100).float().mean().item()
    assert 0.12 < rate < 0.17  # 15% of the non-special tokens
    batch = {k: v[:16] for k, v in first.train.items()}
    one, two = first.train_transform(batch), first.train_transform(batch)
    assert not torch.equal(one["labels"], two["labels"])  # fresh masks every batch
    assert torch.equal(batch["input_ids"], first.train["input_ids"][:16])  # data untouched
    ev = first.eval_transform({k: v[:4] for k, v in first.eval.items()})
    assert ev["labels"].dtype == torch.int64


def test_stdlib_same_settings_same_tensors_and_the_cache_returns_them(tmp_path, monkeypatch):
    fresh = T.stdlib_text(cache=False, **SMALL)
    again = T.stdlib_text(cache=False, **SMALL)
    cached_first = T.stdlib_text(**SMALL)
    files = list((tmp_path / "cache").glob("text-*.pt"))
    assert len(files) == 1
    torch.load(files[0], weights_only=True)  # plain tensors and containers only
    cached_second = T.stdlib_text(**SMALL)
    for other in (again, cached_first, cached_second):
        assert torch.equal(other.train["input_ids"], fresh.train["input_ids"])
        assert torch.equal(other.eval["input_ids"], fresh.eval["input_ids"])
    assert fresh.train["input_ids"].numel() == 8000 // 32 * 32
    assert fresh.train["input_ids"].max() < 400
    longer = T.stdlib_text(seq_len=64, **{k: v for k, v in SMALL.items() if k != "seq_len"})
    assert len(list((tmp_path / "cache").glob("text-*.pt"))) == 1  # packing is after the cache
    assert torch.equal(longer.train["input_ids"].flatten(), fresh.train["input_ids"].flatten())


def test_stdlib_split_is_disjoint_by_file_and_sorted():
    files = T.stdlib_files()
    relative = [rel for rel, _ in files]
    assert relative == sorted(relative) and len(relative) > 100
    assert not any(r.startswith("site-packages/") or "/test/" in f"/{r}" for r in relative)
    assert len(T.stdlib_files(include_tests=True)) > len(files)
    evaluation = {r for r in relative if T._is_eval_file(r, 20)}
    train = {r for r in relative if not T._is_eval_file(r, 20)}
    assert evaluation and not evaluation & train and evaluation | train == set(relative)
    assert 0.02 < len(evaluation) / len(relative) < 0.09


def test_bad_objective_and_seq_len_are_config_errors():
    from speedup.config import ConfigError

    with pytest.raises(ConfigError, match="allowed: clm, mlm"):
        T.stdlib_text(objective="mln")
    with pytest.raises(ConfigError, match="fewer than one block"):
        T.stdlib_text(seq_len=512, max_train_tokens=300, vocab_size=300, cache=False)
