"""BERT and GPT-2 through HFModel: losses, token-weighted accumulation, builders, recipes."""

import json
import math

import pytest
import torch
from _helpers import GradTap
from conftest import Losses

from speedup.config import ConfigError
from speedup.data import DataInfo, DataPathError, TensorBatchLoader, build_dataloaders
from speedup.data import text as T
from speedup.models import language as L
from speedup.trainer import Trainer

SMALL = {"seq_len": 32, "vocab_size": 512, "max_train_tokens": 20_000, "max_eval_tokens": 3_000}


pytestmark = pytest.mark.usefixtures("one_thread")


def info(vocab=64, seq_len=16):
    return DataInfo(
        kind="text", input_shape=(seq_len,), num_classes=vocab, tokens_per_sample=seq_len
    )


@pytest.mark.parametrize(("objective", "builder"), [("clm", L.gpt2), ("mlm", L.bert)])
def test_tiny_models_learn_the_stdlib_corpus(objective, builder):
    splits = T.stdlib_text(objective=objective, **SMALL)
    torch.manual_seed(0)
    model = builder(splits.info)
    train, evaluation = build_dataloaders(splits, batch_size=16, eval_batch_size=64)
    tap = Losses()
    trainer = Trainer(
        model,
        train,
        "30ba",
        eval_dataloader=evaluation,
        optimizer={"name": "adamw", "lr": 3e-3},
        callbacks=[tap],
        eval_interval="0ba",
    )
    before = trainer.eval()
    after = trainer.fit()
    assert all(math.isfinite(x) for x in tap.losses)
    assert sum(tap.losses[-5:]) / 5 < sum(tap.losses[:5]) / 5 - 0.5
    assert after["loss"] < before["loss"] - 0.5
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    accuracy = "accuracy" if objective == "clm" else "masked_accuracy"
    assert 0.0 <= before[accuracy] < after[accuracy] <= 1.0


def lm_batch(vocab=64, rows=4, seq_len=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_loss_weight_counts_the_label_tokens_that_count():
    torch.manual_seed(0)
    gpt, bert = L.gpt2(info()), L.bert(info())
    batch = lm_batch()
    batch["labels"][0, :5] = -100  # 4 of them after the causal shift (position 0 drops)
    batch["labels"][1, 10:] = -100  # 6
    assert int(gpt.loss_weight(batch)) == 4 * 15 - 4 - 6
    assert int(bert.loss_weight(batch)) == 4 * 16 - 5 - 6
    classifier = L.bert(info(), task="classification", num_labels=3, vocab_size=64)
    assert (
        classifier.loss_weight(
            {"input_ids": batch["input_ids"], "labels": torch.tensor([0, 1, 2, 1])}
        )
        == 4
    )


def test_losses_match_the_hugging_face_loss_and_metrics_are_token_weighted():
    torch.manual_seed(0)
    gpt = L.gpt2(info())
    batch = lm_batch()
    batch["labels"][2, 3:9] = -100
    logits = gpt(batch)
    reference = gpt.net(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(gpt.loss(logits, batch), reference)
    metrics = gpt.metrics(logits, batch)
    total, n = metrics["loss"]
    assert int(n) == int(gpt.loss_weight(batch))
    torch.testing.assert_close(total / n, reference)
    bert = L.bert(info())
    masked, labels = T.mlm_mask(batch["input_ids"], 2, 64, (0, 1, 2), 0.3, torch.Generator())
    mlm = {**batch, "input_ids": masked, "labels": labels}
    reference = bert.net(input_ids=masked, labels=labels).loss
    torch.testing.assert_close(bert.loss(bert(mlm), mlm), reference)
    hits, n = bert.metrics(bert(mlm), mlm)["masked_accuracy"]
    assert int(n) == int((labels != -100).sum())
    assert bert.loss(bert(mlm), {**mlm, "labels": torch.full_like(labels, -100)}) == 0


@pytest.mark.parametrize("builder", [L.gpt2, L.bert])
def test_accumulating_microbatches_with_unequal_label_counts_equals_the_full_batch(builder):
    batch = lm_batch(rows=4, seq_len=16, seed=1)
    batch["labels"][:2, :12] = -100  # the first microbatch counts far fewer label tokens
    batch["labels"][3, 5] = -100
    grads = {}
    for micro in (None, 2):
        torch.manual_seed(3)
        model = builder(info())
        tap = GradTap()
        loader = TensorBatchLoader(batch, batch_size=4)
        Trainer(model, loader, "1ba", microbatch_size=micro, callbacks=[tap]).fit()
        grads[micro] = tap.grads[0]
    for whole, accumulated in zip(grads[None], grads[2], strict=True):
        torch.testing.assert_close(accumulated, whole, atol=1e-6, rtol=1e-4)


def test_classification_uses_one_label_per_sequence():
    torch.manual_seed(0)
    model = L.bert(info(), task="classification", num_labels=3, vocab_size=64)
    batch = {**lm_batch(), "labels": torch.tensor([0, 2, 1, 2])}
    logits = model(batch)
    assert logits.shape == (4, 3)
    assert math.isfinite(float(model.loss(logits, batch).detach()))
    assert set(model.metrics(logits, batch)) == {"loss", "accuracy"}
    assert "perplexity" not in model.finalize_metrics({"loss": 1.0, "accuracy": 0.5})
    with pytest.raises(ConfigError, match="model.vocab_size"):
        L.bert(info(), task="classification")


def test_bad_sizes_tasks_and_positions_are_errors_that_list_the_allowed_values():
    with pytest.raises(ValueError, match="allowed: tiny, base"):
        L.gpt2(info(), size="huge")
    with pytest.raises(ValueError, match="allowed: mlm, classification"):
        L.bert(info(), task="clm")
    with pytest.raises(ValueError, match="at least 16"):
        L.bert(info(), max_position_embeddings=8)
    long_data = info(seq_len=600)
    assert L.gpt2(long_data).net.config.n_positions == 600
    assert L.bert(long_data).net.config.max_position_embeddings == 600
    assert L.gpt2(info(vocab=50), vocab_multiple=64).net.config.vocab_size == 64


def test_base_sizes_have_the_published_parameter_counts():
    with torch.device("meta"):  # no memory, no init time
        bert = L.bert(info(vocab=30522, seq_len=128), size="base")
        gpt = L.gpt2(info(vocab=50257, seq_len=1024), size="base")
    assert sum(p.numel() for p in bert.parameters()) == pytest.approx(110e6, rel=0.01)
    assert sum(p.numel() for p in gpt.parameters()) == pytest.approx(124.4e6, rel=0.005)
    assert gpt.net.config.n_layer == 12 and bert.net.config.intermediate_size == 3072


def test_pretrained_loads_a_local_directory_and_a_missing_one_says_what_to_put_there(tmp_path):
    torch.manual_seed(0)
    saved = L.gpt2(info())
    saved.net.save_pretrained(str(tmp_path / "gpt2"))
    loaded = L.gpt2(info(), pretrained=str(tmp_path / "gpt2"))
    for a, b in zip(saved.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataPathError, match=f"{missing}.*config.json.*save_pretrained"):
        L.bert(info(), pretrained=missing)
    with pytest.raises(ConfigError, match="token embeddings"):
        L.gpt2(info(vocab=100), pretrained=str(tmp_path / "gpt2"))


@pytest.mark.parametrize(
    "recipe", ["stdlib-gpt", "stdlib-bert", "gpt2-125m-baseline", "bert-base-baseline"]
)
def test_recipes_plan_and_smoke_run_offline(recipe, tmp_path, capsys):
    from speedup.cli import main

    assert main(["plan", recipe]) == 0
    run_dir = tmp_path / "run"
    assert main(["run", recipe, "--smoke", f"run_dir={run_dir}", "progress_bar=false"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert math.isfinite(summary["metrics"]["loss"])
    assert summary["tokens"] > 0
