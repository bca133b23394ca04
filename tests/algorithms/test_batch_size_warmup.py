"""Batch-size warmup (GPT-3 appendix B; modded-nanogpt record #46): the trained batch and the
LR along a run follow the schedule computed here from its definition; resume is exact."""

import math

import pytest
import torch
from conftest import cli_refusal_test, make_blobs, text_info, tiny_model
from speedup.algorithms.batch_size_warmup import (
    BatchSizeWarmup,
    first_rows,
    lr_multiplier,
    warmup_batch_size,
)

from speedup.callback import Callback
from speedup.checkpoint import CheckpointSaver, list_checkpoints
from speedup.config import ConfigError
from speedup.data import TensorBatchLoader
from speedup.models.language import gpt2
from speedup.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH, LR = 24, 0.1


def schedule_rows(progress, full, start, stages):
    """The definition: start + (1 - start) * floor(p * stages) / stages of the batch, rounded
    down, until p reaches 1; the whole batch from then on."""
    if progress >= 1:
        return full
    return int(full * (start + (1 - start) * math.floor(progress * stages) / stages) + 1e-9)


class Trace(Callback):
    """Rows and LR of each step: before the step (scheduled), at the optimizer step, after."""

    def __init__(self):
        self.rows, self.scheduled, self.stepped, self.after = [], [], [], []
        self.forwards = []

    def before_train_batch(self, state, logger):
        self.rows.append(state.batch_size())
        self.scheduled.append(state.optimizer.param_groups[0]["lr"])
        self.forwards.append(0)

    def before_forward(self, state, logger):
        self.forwards[-1] += 1

    def after_train_batch(self, state, logger):
        self.stepped.append(state.optimizer.param_groups[0]["lr"])

    def batch_end(self, state, logger):
        self.after.append(state.optimizer.param_groups[0]["lr"])


def train(steps, warmup, scheduler=None, callbacks=(), microbatch_size=None, seed=0):
    trace = Trace()
    data = make_blobs(n=8 * BATCH, seed=seed)
    trainer = Trainer(
        tiny_model(seed=seed),
        TensorBatchLoader(data, BATCH, shuffle=True, drop_last=True, seed=seed),
        f"{steps}ba",
        optimizer={"name": "sgd", "lr": LR},
        scheduler=scheduler,
        algorithms=[warmup] if warmup is not None else [],
        callbacks=[trace, *callbacks],
        microbatch_size=microbatch_size,
        device="cpu",
        seed=seed,
    )
    return trainer, trace


def test_the_functional_twins_follow_the_definitions():
    # record #46's defaults: a third, two thirds, then all of a 24-row batch
    got = [warmup_batch_size(p, 24) for p in (0.0, 0.49, 0.5, 0.99, 1.0, 3.0)]
    assert got == [schedule_rows(p, 24, 1 / 3, 2) for p in (0.0, 0.49, 0.5, 0.99, 1.0, 3.0)]
    assert got[0] == 8 and got[2] == 16 and got[4] == 24  # 8, 16, 24 sequences as in #46
    # GPT-3's linear ramp: floor(10 * (0.25 + 0.75 * 0.5)) = 6
    assert warmup_batch_size(0.5, 10, start_fraction=0.25, stages=None) == 6
    # rounded down to a multiple, but never below one multiple
    assert warmup_batch_size(0.0, 24, start_fraction=0.3, multiple_of=4) == 4  # 7.2 -> 4
    assert warmup_batch_size(0.0, 24, start_fraction=0.05, multiple_of=4) == 4  # 1.2 -> 4
    assert lr_multiplier(8, 24, 0.5) == pytest.approx(1 / math.sqrt(3))
    assert lr_multiplier(16, 24, 0.0) == 1.0
    batch = {"input_ids": torch.arange(12).view(6, 2), "scalar": torch.tensor(3.0)}
    kept = first_rows(batch, 4)
    assert torch.equal(kept["input_ids"], batch["input_ids"][:4]) and kept["scalar"] == 3.0


def test_rows_and_lr_along_a_run_follow_the_schedule_without_a_scheduler():
    warmup = BatchSizeWarmup(duration="9ba", start_fraction=1 / 3, stages=3, lr_power=0.5)
    trainer, trace = train(12, warmup)
    trainer.fit()
    expected = [schedule_rows(step / 9, BATCH, 1 / 3, 3) for step in range(12)]
    assert trace.rows == expected  # 8 x3, 13 x3, 18 x3, 24 x3
    assert trace.stepped == pytest.approx([LR * (r / BATCH) ** 0.5 for r in expected])
    assert trace.after == [LR] * 12  # the recipe's LR is back after every step
    assert warmup.samples == sum(expected)  # samples trained ...
    assert trainer.state.timestamp.sample == 12 * BATCH  # ... while the data counts drawn ones


def test_with_a_scheduler_the_lr_is_the_scheduled_one_times_the_multiplier():
    cosine = {"name": "cosine", "warmup": "2ba"}
    warmup = BatchSizeWarmup(duration="0.5dur", start_fraction=0.25, stages=None, lr_power=0.7)
    trainer, trace = train(12, warmup, scheduler=cosine)
    trainer.fit()
    plain, reference = train(12, None, scheduler=cosine)
    plain.fit()
    # the linear ramp over the first 6 of 12 steps: p = step / 6
    rows = [BATCH if s >= 6 else int(BATCH * (0.25 + 0.75 * s / 6) + 1e-9) for s in range(12)]
    assert trace.rows == rows
    assert trace.scheduled == reference.scheduled  # the schedule itself is untouched
    expected = [lr * (r / BATCH) ** 0.7 for lr, r in zip(reference.scheduled, rows)]
    assert trace.stepped == pytest.approx(expected)


def test_sample_durations_count_the_samples_trained_not_drawn():
    warmup = BatchSizeWarmup(duration="60sp", start_fraction=1 / 3, stages=2)
    trainer, trace = train(8, warmup)
    trainer.fit()
    expected, trained = [], 0
    for _ in range(8):
        rows = schedule_rows(trained / 60, BATCH, 1 / 3, 2)
        expected.append(rows)
        trained += rows
    assert trace.rows == expected  # [8, 8, 8, 8, 16, 16, 24, 24]
    drawn_clock = [schedule_rows(s * BATCH / 60, BATCH, 1 / 3, 2) for s in range(8)]
    assert trace.rows != drawn_clock  # counting drawn samples would end the warmup sooner


def test_token_durations_count_the_tokens_trained():
    seq, vocab = 8, 32
    info = text_info(seq, vocab)
    ids = torch.randint(0, vocab, (48, seq), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    torch.manual_seed(0)
    warmup = BatchSizeWarmup(duration="400tok", start_fraction=0.25, stages=4)
    trace = Trace()
    trainer = Trainer(
        gpt2(info, size="tiny"),
        TensorBatchLoader(data, 12, shuffle=True, drop_last=True, seed=0),
        "6ba",
        optimizer={"name": "adamw", "lr": 1e-3},
        algorithms=[warmup],
        callbacks=[trace],
        device="cpu",
        data_kind="text",
        tokens_per_sample=seq,
    )
    trainer.fit()
    expected, tokens = [], 0
    for _ in range(6):
        rows = schedule_rows(tokens / 400, 12, 0.25, 4)
        expected.append(rows)
        tokens += rows * seq
    assert trace.rows == expected
    assert trainer.state.timestamp.token == sum(expected) * seq


def test_resuming_mid_warmup_is_exact(tmp_path):
    def run(resume=None):
        warmup = BatchSizeWarmup(duration="90sp", start_fraction=1 / 3, stages=3)
        saver = CheckpointSaver(tmp_path, "7ba", keep_last=0, save_final=False)
        trainer, trace = train(14, warmup, callbacks=[] if resume else [saver])
        if resume is not None:
            trainer.load_checkpoint(resume)
        trainer.fit()
        return trainer, trace, warmup

    whole, whole_trace, whole_warmup = run()
    saved = [p for p in list_checkpoints(tmp_path) if p.name.endswith("-ba7")]
    resumed, resumed_trace, resumed_warmup = run(resume=saved[0])
    # the checkpoint falls mid-warmup: the batch grows before it and after it
    assert len(set(whole_trace.rows[:7])) > 1 and len(set(whole_trace.rows[7:])) > 1
    assert resumed_trace.rows == whole_trace.rows[7:]
    assert resumed_trace.stepped == whole_trace.stepped[7:]
    assert resumed_warmup.samples == whole_warmup.samples
    for key, value in whole.state.model.state_dict().items():
        assert torch.equal(value, resumed.state.model.state_dict()[key]), key


def test_microbatches_split_the_kept_rows_and_keep_the_batch_gradient():
    def run(size):
        warmup = BatchSizeWarmup(duration="6ba", start_fraction=0.5, stages=2)
        trainer, trace = train(6, warmup, microbatch_size=size)
        trainer.fit()
        return trainer, trace

    whole, whole_trace = run(None)
    split, split_trace = run(5)
    assert split_trace.rows == whole_trace.rows == [12, 12, 12, 18, 18, 18]
    assert split_trace.forwards == [math.ceil(r / 5) for r in split_trace.rows]  # 3, 3, 3, 4...
    for key, value in whole.state.model.state_dict().items():
        torch.testing.assert_close(split.state.model.state_dict()[key], value)


def test_a_token_duration_without_token_data_is_refused_at_fit_start():
    trainer, _ = train(2, BatchSizeWarmup(duration="100tok"))
    with pytest.raises(ConfigError, match="batch_size_warmup.duration: 100tok needs token data"):
        trainer.fit()
    assert trainer.state.timestamp.batch == 0


test_bad_arguments_exit_2_with_one_line_naming_the_key = cli_refusal_test(
    "quickstart",
    [
        ("algorithms.batch_size_warmup.stages=0", ["algorithms.batch_size_warmup", "stages"]),
        ("algorithms.batch_size_warmup.start_fraction=1.5", ["start_fraction", "(0, 1]"]),
        ("algorithms.batch_size_warmup.lr_power=-1", ["lr_power", ">= 0"]),
        ("algorithms.batch_size_warmup.duration=30sec", ["duration", "wall-clock"]),
    ],
)
