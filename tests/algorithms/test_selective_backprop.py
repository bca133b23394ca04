import math

import pytest
import torch
import torch.nn.functional as F
from conftest import loaders, make_blobs, tiny_model
from speedup.algorithms.progressive_resizing import ProgressiveResizing
from speedup.algorithms.selective_backprop import (
    SelectiveBackprop,
    highest_loss_indices,
    kept_count,
    select_using_loss,
)
from torch import nn

from speedup.callback import Callback
from speedup.config import ConfigError
from speedup.data import DataInfo, TensorBatchLoader
from speedup.engine import build_plan
from speedup.event import Event
from speedup.models import Classifier
from speedup.models.base import Model
from speedup.trainer import Trainer

# -- the selection ----------------------------------------------------------------------------


def test_kept_count_is_ceil_of_keep_times_n_and_at_least_one():
    assert kept_count(8, 0.5) == 4
    assert kept_count(7, 0.5) == 4  # ceil(3.5)
    assert kept_count(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 in floats: still 3
    assert kept_count(10, 0.31) == 4
    assert kept_count(3, 0.01) == 1
    assert kept_count(5, 1.0) == 5


def test_highest_loss_indices_keep_the_largest_in_batch_order_ties_to_the_earlier():
    losses = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2, 0.7])
    assert highest_loss_indices(losses, 0.5).tolist() == [1, 3, 5]
    assert highest_loss_indices(losses, 0.4).tolist() == [1, 3, 5]  # ceil(2.4) = 3
    assert highest_loss_indices(losses, 0.3).tolist() == [1, 3]  # ceil(1.8) = 2
    assert highest_loss_indices(losses, 0.1).tolist() == [1]  # the tie goes to the earlier
    assert highest_loss_indices(torch.ones(4), 0.5).tolist() == [0, 1]
    with pytest.raises(ValueError, match="keep must be in"):
        highest_loss_indices(losses, 0.0)


def bn_classifier(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    return Classifier(net, 4)


def test_select_using_loss_keeps_exactly_the_highest_loss_samples():
    model = bn_classifier()
    model.train()
    batch = make_blobs(n=10, seed=3)
    batch["weight"] = torch.arange(10.0)  # any per-sample tensor follows the selection
    batch["scalar"] = torch.tensor(7.0)  # others pass through
    bn = model.net[1]
    before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    selected, index = select_using_loss(batch, model, keep=0.3)
    # the selection forward left BatchNorm's statistics alone
    assert torch.equal(bn.running_mean, before[0])
    assert torch.equal(bn.num_batches_tracked, before[1])
    with torch.no_grad():  # train mode: BatchNorm normalises with the batch's statistics
        reference = F.cross_entropy(model(batch), batch["targets"], reduction="none")
    expected = sorted(reference.argsort(descending=True)[:3].tolist())
    assert index.tolist() == expected
    assert torch.equal(selected["inputs"], batch["inputs"][expected])
    assert torch.equal(selected["targets"], batch["targets"][expected])
    assert selected["weight"].tolist() == [float(i) for i in expected]
    assert selected["scalar"] is batch["scalar"]
    dropped = [i for i in range(10) if i not in expected]
    assert reference[index].min() >= reference[dropped].max()


def test_scale_factor_downscales_the_selection_forward_only():
    shapes = []

    class Spy(Classifier):
        def forward(self, batch):
            shapes.append(tuple(batch["inputs"].shape))
            return super().forward(batch)

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )
    model = Spy(net, 10)
    g = torch.Generator().manual_seed(0)
    images = {"inputs": torch.randn(16, 3, 16, 16, generator=g), "targets": torch.arange(16) % 10}
    loader = TensorBatchLoader(images, 8, shuffle=True, drop_last=True, seed=0)
    algorithm = SelectiveBackprop(start="0ba", end="1ba", interval=1, scale_factor=0.5)
    Trainer(model, loader, "1ba", algorithms=[algorithm]).fit()
    assert shapes == [(8, 3, 8, 8), (4, 3, 16, 16)]  # selection at half size, training full
    with pytest.raises(ValueError, match="scale_factor < 1 needs floating"):
        select_using_loss(
            {"inputs": torch.zeros(4, 8), "targets": torch.zeros(4).long()},
            tiny_model(),
            scale_factor=0.5,
        )


def test_per_sample_losses_average_to_the_models_loss():
    model = tiny_model()
    batch = make_blobs(n=12)
    outputs = model(batch)
    per_sample = model.per_sample_loss(outputs, batch)
    assert per_sample.shape == (12,)
    torch.testing.assert_close(per_sample.mean(), model.loss(outputs, batch))
    soft = {**batch, "targets": torch.softmax(torch.randn(12, 4), -1)}
    torch.testing.assert_close(
        model.per_sample_loss(outputs, soft).mean(), model.loss(outputs, soft)
    )


def test_language_model_per_sample_loss_is_each_sequences_token_mean():
    from speedup.models import language as L

    torch.manual_seed(0)
    model = L.gpt2(DataInfo(kind="text", input_shape=(16,), num_classes=64, tokens_per_sample=16))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (3, 16), generator=g)
    labels = ids.clone()
    labels[1, 10:] = -100  # a shorter sequence
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        logits = model(batch)
        per_sample = model.per_sample_loss(logits, batch)
        for row in range(3):
            one = {k: v[row : row + 1] for k, v in batch.items()}
            torch.testing.assert_close(per_sample[row], model.loss(logits[row : row + 1], one))
        weights = (labels[:, 1:] != -100).sum(1).float()
        torch.testing.assert_close(
            (per_sample * weights).sum() / weights.sum(), model.loss(logits, batch)
        )


def test_a_model_without_per_sample_loss_is_refused_at_fit_start():
    class Plain(Model):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, batch):
            return self.lin(batch["inputs"])

        def loss(self, outputs, batch):
            return F.cross_entropy(outputs, batch["targets"])

    train_loader, _ = loaders(make_blobs(n=32), batch_size=8)
    trainer = Trainer(Plain(), train_loader, "2ba", algorithms=[SelectiveBackprop()])
    with pytest.raises(ConfigError, match="Plain does not define per_sample_loss"):
        trainer.fit()


# -- in a run ---------------------------------------------------------------------------------


class BatchSizes(Callback):
    def __init__(self):
        self.sizes = {}

    def batch_start(self, state, logger):
        self.sizes[state.timestamp.batch] = state.batch_size()


def run(algorithm, steps=20, batch_size=8, callbacks=()):
    train_loader, _ = loaders(make_blobs(n=64), batch_size=batch_size)
    trainer = Trainer(
        tiny_model(),
        train_loader,
        f"{steps}ba",
        algorithms=[algorithm],
        callbacks=list(callbacks),
        optimizer={"name": "sgd", "lr": 0.1},
    )
    trainer.fit()
    return trainer


def test_active_only_inside_its_window_every_interval_steps():
    sizes = BatchSizes()
    algorithm = SelectiveBackprop(start="0.25dur", end="0.75dur", keep=0.25, interval=2)
    trainer = run(algorithm, callbacks=[sizes])
    active = [b for b in range(20) if 5 <= b < 15 and b % 2 == 0]  # [6, 8, 10, 12, 14]
    assert sizes.sizes == {b: (2 if b in active else 8) for b in range(20)}
    assert algorithm.steps_applied == len(active) == 5
    # the timestamp counts the samples drawn from the data (the data position), not those kept
    assert trainer.state.timestamp.sample == 20 * 8


def test_smoke_20_steps_with_defaults_halves_every_other_batch_in_its_window():
    sizes = BatchSizes()
    algorithm = SelectiveBackprop()
    trainer = run(algorithm, callbacks=[sizes])
    assert math.isfinite(float(trainer.state.train_metrics["loss"]))
    # 0.5dur-0.9dur of 20 steps is [10, 18); even steps: 10, 12, 14, 16
    assert [b for b, n in sizes.sizes.items() if n == 4] == [10, 12, 14, 16]
    assert all(n == 8 for b, n in sizes.sizes.items() if b not in (10, 12, 14, 16))
    assert algorithm.steps_applied == 4


def test_selection_is_deterministic_and_inactive_steps_match_a_plain_run():
    def weights(trainer):
        return [p.detach().clone() for p in trainer.state.model.parameters()]

    a = weights(run(SelectiveBackprop(start="0.5dur", end="0.9dur")))
    b = weights(run(SelectiveBackprop(start="0.5dur", end="0.9dur")))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    early = weights(run(SelectiveBackprop(start="10ba", end="12ba"), steps=10))
    plain = weights(run(SelectiveBackprop(start="10ba", end="12ba", keep=1.0), steps=10))
    assert all(torch.equal(x, y) for x, y in zip(early, plain))
    late = weights(run(SelectiveBackprop(start="0ba", end="2ba", interval=1), steps=10))
    assert not all(torch.equal(x, y) for x, y in zip(late, plain))


# -- arguments and declaration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"keep": 0.0}, r"selective_backprop.keep must be in \(0, 1\], got 0"),
        ({"keep": 1.5}, r"selective_backprop.keep must be in \(0, 1\]"),
        ({"scale_factor": 0.0}, r"selective_backprop.scale_factor must be in \(0, 1\]"),
        ({"scale_factor": 2.0}, r"selective_backprop.scale_factor must be in \(0, 1\]"),
        ({"interval": 0}, "selective_backprop.interval must be an integer >= 1, got 0"),
        ({"start": "0.9dur", "end": "0.5dur"}, "selective_backprop.end must be after start"),
        ({"start": "later"}, "selective_backprop.start"),
        ({"end": "5sec"}, "selective_backprop.end.*wall-clock"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SelectiveBackprop(**kwargs)


def test_declaration_runs_before_batch_augmentations():
    decl = SelectiveBackprop().declare()
    access = decl.events[Event.AFTER_DATALOADER]
    assert access.writes == {"batch"} and {"batch", "model.weights"} <= access.reads
    assert decl.runs_before == {
        "mixup",
        "cutmix",
        "cutout",
        "colout",
        "randaugment",
        "augmix",
        "progressive_resizing",
    }
    assert decl.runs_after == {"seq_length_warmup", "alibi"}
    assert decl.model_kinds is None and decl.data_kinds is None
    algorithms = [ProgressiveResizing(), SelectiveBackprop()]
    plan = build_plan(
        {a.name: a.declare() for a in algorithms}, "cnn", "image", algorithms=algorithms
    )
    assert plan.conflicts == []
    assert plan.order[Event.AFTER_DATALOADER] == ["selective_backprop", "progressive_resizing"]


def test_selection_on_a_language_model_keeps_whole_sequences():
    from speedup.models import language as L

    torch.manual_seed(0)
    model = L.gpt2(DataInfo(kind="text", input_shape=(8,), num_classes=32, tokens_per_sample=8))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32, (8, 8), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loader = TensorBatchLoader(data, 4, shuffle=True, drop_last=True, seed=0)
    sizes = BatchSizes()
    algorithm = SelectiveBackprop(start="0ba", end="2ba", keep=0.5, interval=1)
    trainer = Trainer(model, loader, "2ba", algorithms=[algorithm], callbacks=[sizes])
    trainer.fit()
    assert sizes.sizes == {0: 2, 1: 2}
    assert trainer.state.timestamp.token == 2 * 2 * 8  # tokens of the kept sequences
    assert math.isfinite(float(trainer.state.train_metrics["loss"]))
