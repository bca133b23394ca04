import math

import pytest
import torch
from conftest import bad_arguments_test, plan_of, stand_in, text_info
from speedup.algorithms.seq_length_warmup import (
    SeqLengthWarmup,
    set_batch_sequence_length,
    warmup_sequence_length,
)

from speedup.algorithm import Access
from speedup.callback import Callback
from speedup.config import ConfigError
from speedup.data import DataInfo, TensorBatchLoader
from speedup.engine import PlanError, build_plan
from speedup.event import Event
from speedup.models.language import gpt2
from speedup.trainer import Trainer

SEQ, VOCAB = 32, 64


pytestmark = pytest.mark.usefixtures("one_thread")


def token_data(n=64, seq=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def numbered_batch(rows=4, seq=16):
    """Token j of row i is 100 * i + j: every position says where it came from."""
    ids = 100 * torch.arange(rows)[:, None] + torch.arange(seq)[None, :]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids + 1}


# -- the schedule -----------------------------------------------------------------------------


def test_schedule_ramps_in_steps_of_eight_and_reaches_full_length_at_the_end_of_warmup():
    # (64 - 8) / 8 = 7 steps over 14 batches: the length grows by 8 every 2 batches.
    lengths = [warmup_sequence_length(b, 14, 64, 8, 8) for b in range(17)]
    assert lengths == [8, 8, 16, 16, 24, 24, 32, 32, 40, 40, 48, 48, 56, 56, 64, 64, 64]


def test_schedule_matches_the_linear_ramp_rounded_down():
    for batch in range(0, 300, 7):
        length = warmup_sequence_length(batch, 300, 1024, 64, 16)
        linear = 64 + (1024 - 64) * batch / 300
        assert length % 16 == 0 and length <= linear < length + 16


def test_schedule_edge_cases():
    assert warmup_sequence_length(0, 0, 32, 8, 8) == 32  # no warmup
    assert warmup_sequence_length(0, 10, 8, 16, 8) == 8  # min above the data's length
    assert warmup_sequence_length(9, 10, 30, 8, 8) == 24  # full length not a multiple of 8
    assert warmup_sequence_length(10, 10, 30, 8, 8) == 30


# -- the functional twin ----------------------------------------------------------------------


def test_truncation_keeps_each_rows_prefix_and_labels_aligned():
    batch = numbered_batch()
    batch["sequence_label"] = torch.tensor([0, 1, 0, 1])
    out = set_batch_sequence_length(batch, 8)
    assert out["input_ids"].shape == (4, 8)
    assert torch.equal(out["input_ids"], batch["input_ids"][:, :8])
    assert torch.equal(out["labels"], out["input_ids"] + 1)
    assert out["attention_mask"].shape == (4, 8)
    assert torch.equal(out["sequence_label"], batch["sequence_label"])  # per sequence: kept
    assert batch["input_ids"].shape == (4, 16)  # the input batch is not modified


def test_reshaping_keeps_every_token_as_consecutive_segments():
    batch = numbered_batch(rows=3, seq=16)
    out = set_batch_sequence_length(batch, 8, truncate=False)
    assert out["input_ids"].shape == (6, 8)
    expected = torch.stack([torch.arange(8) + 100 * (r // 2) + 8 * (r % 2) for r in range(6)])
    assert torch.equal(out["input_ids"], expected)
    assert torch.equal(out["labels"], out["input_ids"] + 1)
    # a length that does not divide L: the remainder of the batch is dropped
    out = set_batch_sequence_length(batch, 5, truncate=False)
    assert out["input_ids"].shape == (9, 5)  # 48 tokens -> 9 rows, 3 left over
    assert torch.equal(out["input_ids"].flatten(), batch["input_ids"].flatten()[:45])


def test_reshaping_refuses_tensors_that_are_not_sequences():
    batch = numbered_batch()
    batch["sequence_label"] = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="sequence_label"):
        set_batch_sequence_length(batch, 8, truncate=False)


def test_a_length_at_or_above_full_returns_the_batch_unchanged():
    batch = numbered_batch()
    out = set_batch_sequence_length(batch, 64)
    assert all(out[k] is batch[k] for k in batch)
    with pytest.raises(ValueError, match="length"):
        set_batch_sequence_length(batch, 0)


# -- arguments and declaration ----------------------------------------------------------------


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    SeqLengthWarmup,
    [
        ({"duration": "-0.1dur"}, "seq_length_warmup.duration: .*negative"),
        ({"duration": "5sec"}, "wall-clock"),
        ({"duration": "soon"}, "seq_length_warmup.duration"),
        ({"min_seq_length": 12}, "seq_length_warmup.min_seq_length must be a positive multiple"),
        ({"min_seq_length": 0}, "min_seq_length"),
        ({"step_size": 4}, "seq_length_warmup.step_size must be a positive multiple of 8"),
    ],
)


def test_declaration_applies_to_text_and_writes_the_batch_after_the_dataloader():
    declaration = SeqLengthWarmup().declare()
    assert declaration.data_kinds == {"text"}
    assert declaration.events[Event.AFTER_DATALOADER].writes == {"batch"}
    assert "timestamp" in declaration.events[Event.AFTER_DATALOADER].reads
    assert set(declaration.events) == {Event.FIT_START, Event.AFTER_DATALOADER}
    plan = build_plan({"seq_length_warmup": declaration}, data_kind="image")
    assert [c.kind for c in plan.conflicts] == ["not-applicable"]


def test_another_batch_writer_needs_an_order():
    masking = stand_in("mlm_masking", {Event.AFTER_DATALOADER: Access(writes={"batch.labels"})})
    assert [c.kind for c in plan_of([SeqLengthWarmup(), masking]).conflicts] == ["write-write"]


# -- in a run ---------------------------------------------------------------------------------


class Shapes(Callback):
    def __init__(self):
        self.seen = []

    def batch_start(self, state, logger):
        batch = state.batch
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        assert torch.equal(batch["labels"], batch["input_ids"])  # still aligned
        self.seen.append(tuple(batch["input_ids"].shape))

    def batch_end(self, state, logger):
        assert math.isfinite(float(state.train_metrics["loss"]))


def run(algorithm, steps=20, batch_size=8):
    torch.manual_seed(0)
    info = text_info(SEQ, VOCAB)
    loader = TensorBatchLoader(token_data(), batch_size, shuffle=True, drop_last=True, seed=0)
    shapes = Shapes()
    trainer = Trainer(
        gpt2(info, size="tiny"),
        loader,
        f"{steps}ba",
        algorithms=[algorithm],
        callbacks=[shapes],
        optimizer={"name": "adamw", "lr": 1e-3},
        data_kind="text",
        tokens_per_sample=SEQ,
        device="cpu",
    )
    trainer.fit()
    return trainer, shapes.seen


def test_twenty_steps_follow_the_schedule_exactly_and_count_the_tokens_trained_on():
    # 0.7 of 20 batches = 14 warmup batches; (32 - 8) / 8 = 3 steps: +8 every 14/3 batches.
    trainer, seen = run(SeqLengthWarmup(duration="0.7dur", min_seq_length=8, step_size=8))
    expected = [8 + 8 * math.floor(24 * b / (8 * 14)) if b < 14 else 32 for b in range(20)]
    assert [s[1] for s in seen] == expected
    assert expected[:6] == [8, 8, 8, 8, 8, 16] and expected[13:15] == [24, 32]
    assert all(rows == 8 for rows, _ in seen)
    timestamp = trainer.state.timestamp
    assert timestamp.token == 8 * sum(expected)  # tokens trained on, not tokens loaded
    assert timestamp.sample == 20 * 8 and timestamp.batch == 20


def test_reshaping_in_a_run_keeps_every_token():
    trainer, seen = run(SeqLengthWarmup(duration="10ba", truncate=False), steps=4)
    # batch b: length 8 + 8 * floor(24 b / 80) = 8 for b < 4: [8, 32] -> [32, 8]
    assert seen == [(32, 8)] * 4
    assert trainer.state.timestamp.token == 4 * 8 * SEQ


def test_warmup_in_tokens_without_token_counts_is_a_config_error():
    algorithm = SeqLengthWarmup(duration="1000tok")
    loader = TensorBatchLoader(token_data(n=16), 8, drop_last=True)
    info = DataInfo(kind="text", input_shape=(SEQ,), num_classes=VOCAB)
    trainer = Trainer(gpt2(info), loader, "1ba", algorithms=[algorithm], device="cpu")
    with pytest.raises(ConfigError, match="seq_length_warmup.duration"):
        trainer.fit()


def test_not_applicable_to_image_data_in_a_trainer():
    loader = TensorBatchLoader(token_data(n=16), 8, drop_last=True)
    info = DataInfo(kind="text", input_shape=(SEQ,), num_classes=VOCAB)
    with pytest.raises(PlanError, match="seq_length_warmup does not apply to data kind"):
        Trainer(gpt2(info), loader, "1ba", algorithms=[SeqLengthWarmup()], data_kind="image")
