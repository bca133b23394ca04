import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SaveAt,
    algorithm_trainer,
    bad_arguments_test,
    loaders,
    make_blobs,
    plan_of,
    text_info,
    tiny_model,
)
from speedup.algorithms.progressive_resizing import ProgressiveResizing
from speedup.algorithms.selective_backprop import (
    SelectiveBackprop,
    highest_loss_indices,
    kept_count,
    loss_percentiles,
    sampled_loss_indices,
    select_using_loss,
    selection_probabilities,
    updated_history,
)
from torch import nn

from speedup.algorithm import ALGORITHMS
from speedup.callback import Callback
from speedup.checkpoint import save_checkpoint
from speedup.config import ConfigError, load_config
from speedup.data import TensorBatchLoader
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


# -- the probabilistic rule (Jiang et al. 2019) -------------------------------------------------


def reference_probabilities(losses, history, beta):
    """P(select) = CDF(loss) ** beta, CDF = the share of the history strictly below the loss,
    written out with Python lists."""
    history = [float(h) for h in history]
    return [(sum(h < float(x) for h in history) / len(history)) ** beta for x in losses]


def test_selection_probabilities_are_the_loss_percentile_to_the_power_beta():
    history = torch.tensor([0.2, 1.5, 0.7, 3.0, 0.7, 0.1, 2.2, 0.9, 1.1, 0.4])
    losses = torch.tensor([0.05, 0.7, 0.8, 1.2, 2.5, 3.0, 9.0])
    # percentiles by hand: nothing below 0.05; 0.7 beats 0.2, 0.1, 0.4 (not itself): 3/10
    assert loss_percentiles(losses, history).tolist() == pytest.approx(
        [0.0, 0.3, 0.5, 0.7, 0.9, 0.9, 1.0]
    )
    for beta in (1.0, 2.0, 3.0, 0.5):
        expected = reference_probabilities(losses, history, beta)
        assert selection_probabilities(losses, history, beta).tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="beta must be > 0"):
        selection_probabilities(losses, history, 0.0)
    with pytest.raises(ValueError, match="history is empty"):
        loss_percentiles(losses, torch.zeros(0))


def test_the_history_is_a_window_of_the_most_recent_losses():
    history = torch.zeros(0)
    history = updated_history(history, torch.tensor([1.0, 2.0, 3.0]), 5)
    assert history.tolist() == [1.0, 2.0, 3.0]
    history = updated_history(history, torch.tensor([4.0, 5.0, 6.0]), 5)
    assert history.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]  # the oldest fell out
    assert updated_history(history, torch.arange(8.0), 5).tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]


def test_sampled_indices_follow_independent_uniform_draws():
    history = torch.linspace(0.0, 1.0, 11)
    losses = torch.tensor([0.05, 0.35, 0.55, 0.95, 2.0, 0.75])
    probabilities = reference_probabilities(losses, history, 2.0)
    kept = sampled_loss_indices(losses, history, 2.0, torch.Generator().manual_seed(3))
    draws = torch.rand(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert kept.tolist() == [i for i in range(6) if draws[i] < probabilities[i]]
    # over many draws each sample is kept with its probability (binomial sd <= 0.008)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    trials = 4000
    for _ in range(trials):
        counts[sampled_loss_indices(losses, history, 2.0, generator)] += 1
    assert (counts / trials).tolist() == pytest.approx(probabilities, abs=0.035)


def test_a_draw_that_keeps_nobody_keeps_the_highest_loss():
    losses = torch.tensor([0.3, 0.1, 0.3, 0.2])
    history = torch.tensor([5.0, 6.0])  # every loss is below the whole history: P = 0
    assert sampled_loss_indices(losses, history, 1.0, torch.Generator()).tolist() == [0]


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
    algorithm = SelectiveBackprop(
        start="0ba", end="1ba", interval=1, scale_factor=0.5, selection="topk"
    )
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
    model = L.gpt2(text_info(16, 64))
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
    trainer = algorithm_trainer(tiny_model(), train_loader, algorithm, steps, callbacks, lr=0.1)
    trainer.fit()
    return trainer


def test_active_only_inside_its_window_every_interval_steps():
    sizes = BatchSizes()
    algorithm = SelectiveBackprop(
        start="0.25dur", end="0.75dur", selection="topk", keep=0.25, interval=2
    )
    trainer = run(algorithm, callbacks=[sizes])
    active = [b for b in range(20) if 5 <= b < 15 and b % 2 == 0]  # [6, 8, 10, 12, 14]
    assert sizes.sizes == {b: (2 if b in active else 8) for b in range(20)}
    assert algorithm.steps_applied == len(active) == 5
    # the timestamp counts the samples drawn from the data (the data position), not those kept
    assert trainer.state.timestamp.sample == 20 * 8


def test_smoke_20_steps_of_topk_halves_every_other_batch_in_its_window():
    sizes = BatchSizes()
    algorithm = SelectiveBackprop(selection="topk")
    trainer = run(algorithm, callbacks=[sizes])
    assert math.isfinite(float(trainer.state.train_metrics["loss"]))
    # 0.5dur-0.9dur of 20 steps is [10, 18); even steps: 10, 12, 14, 16
    assert [b for b, n in sizes.sizes.items() if n == 4] == [10, 12, 14, 16]
    assert all(n == 8 for b, n in sizes.sizes.items() if b not in (10, 12, 14, 16))
    assert algorithm.steps_applied == 4


def test_selection_is_deterministic_and_inactive_steps_match_a_plain_run():
    def weights(trainer):
        return [p.detach().clone() for p in trainer.state.model.parameters()]

    a = weights(run(SelectiveBackprop(start="0.5dur", end="0.9dur", selection="topk")))
    b = weights(run(SelectiveBackprop(start="0.5dur", end="0.9dur", selection="topk")))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    early = weights(run(SelectiveBackprop(start="10ba", end="12ba"), steps=10))
    full_batch = SelectiveBackprop(start="10ba", end="12ba", selection="topk", keep=1.0)
    plain = weights(run(full_batch, steps=10))
    assert all(torch.equal(x, y) for x, y in zip(early, plain))
    late = weights(run(SelectiveBackprop(start="0ba", end="2ba", interval=1), steps=10))
    assert not all(torch.equal(x, y) for x, y in zip(late, plain))


def test_probabilistic_selection_in_a_run_keeps_samples_by_their_percentile_in_the_history():
    recorded = []

    class Recorder(SelectiveBackprop):
        def _select(self, losses):
            before = self.history.clone()
            draws_state = self.generator.get_state()
            index = super()._select(losses)
            recorded.append((losses.clone(), before, draws_state, index.clone()))
            return index

    sizes = BatchSizes()
    algorithm = Recorder(
        start="0ba", end="12ba", interval=1, selection="probabilistic", beta=1.0, history_size=20
    )
    run(algorithm, steps=12, callbacks=[sizes])
    assert len(recorded) == 12
    for step, (losses, before, draws_state, index) in enumerate(recorded):
        # the batch's losses join the window of the last 20 first, then each is ranked in it
        window = torch.cat([before, losses])[-20:]
        assert before.numel() == min(20, 8 * step)
        generator = torch.Generator()
        generator.set_state(draws_state)
        draws = torch.rand(8, generator=generator, dtype=torch.float64)
        probabilities = reference_probabilities(losses, window, 1.0)
        expected = [i for i in range(8) if draws[i] < probabilities[i]]
        expected = expected or [int(torch.argmax(losses))]
        assert index.tolist() == expected
        assert sizes.sizes[step] == len(expected)
    assert len({sizes.sizes[b] for b in range(12)}) > 1  # the kept count varies by batch


def test_probabilistic_draws_follow_the_run_seed():
    def kept_sizes(seed):
        sizes = BatchSizes()
        train_loader, _ = loaders(make_blobs(n=64), batch_size=8)
        algorithm = SelectiveBackprop(
            start="0ba", end="20ba", interval=1, selection="probabilistic"
        )
        Trainer(
            tiny_model(), train_loader, "20ba", algorithms=[algorithm], callbacks=[sizes], seed=seed
        ).fit()
        return [sizes.sizes[b] for b in range(20)]

    assert kept_sizes(0) == kept_sizes(0)
    assert kept_sizes(0) != kept_sizes(1)


def test_resume_continues_the_draws_and_the_history_exactly(tmp_path):
    def algorithm():
        return SelectiveBackprop(
            start="0ba", end="20ba", interval=1, selection="probabilistic", history_size=50
        )

    saver = SaveAt(7, lambda state: save_checkpoint(state, tmp_path))
    sizes = BatchSizes()
    full = run(algorithm(), 20, callbacks=[saver, sizes])
    resumed_sizes = BatchSizes()
    resumed_algorithm = algorithm()
    train_loader, _ = loaders(make_blobs(n=64), batch_size=8)
    trainer = algorithm_trainer(
        tiny_model(seed=5),  # other weights: the checkpoint must restore everything
        train_loader,
        resumed_algorithm,
        callbacks=[resumed_sizes],
        lr=0.1,
        seed=99,  # another seed too: the draws must continue from the saved generator
    )
    trainer.load_checkpoint(saver.saved)
    trainer.fit()
    assert resumed_sizes.sizes == {b: sizes.sizes[b] for b in range(7, 20)}
    first = full.state.algorithms[0]
    assert torch.equal(first.history, resumed_algorithm.history)
    assert torch.equal(first.generator.get_state(), resumed_algorithm.generator.get_state())
    for name, value in full.state.model.state_dict().items():
        assert torch.equal(trainer.state.model.state_dict()[name], value), name


# -- arguments and declaration -----------------------------------------------------------------


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    SelectiveBackprop,
    [
        ({"selection": "topk", "keep": 0.0}, r"keep must be in \(0, 1\], got 0"),
        ({"selection": "topk", "keep": 1.5}, r"selective_backprop.keep must be in \(0, 1\]"),
        ({"scale_factor": 0.0}, r"selective_backprop.scale_factor must be in \(0, 1\]"),
        ({"scale_factor": 2.0}, r"selective_backprop.scale_factor must be in \(0, 1\]"),
        ({"interval": 0}, "selective_backprop.interval must be an integer >= 1, got 0"),
        ({"start": "0.9dur", "end": "0.5dur"}, "selective_backprop.end must be after start"),
        ({"start": "later"}, "selective_backprop.start"),
        ({"end": "5sec"}, "selective_backprop.end.*wall-clock"),
        (
            {"selection": "random"},
            "selective_backprop.selection must be one of probabilistic, topk",
        ),
        ({"selection": "probabilistic", "beta": 0}, "selective_backprop.beta must be > 0, got 0"),
        (
            {"selection": "probabilistic", "history_size": 0},
            "selective_backprop.history_size must be an integer >= 1, got 0",
        ),
        (
            {"selection": "probabilistic", "keep": 0.3},
            "selective_backprop.keep applies to selection 'topk' only.*set beta",
        ),
        ({"beta": 2.0}, "beta applies to selection 'probabilistic' only, and selection is 'topk'"),
        ({"selection": "topk", "history_size": 9}, "history_size applies to selection 'prob"),
    ],
)


def test_a_recipe_with_a_bad_selection_fails_at_validation():
    with pytest.raises(ConfigError, match="algorithms.selective_backprop: .*selection must be one"):
        load_config("shapes2d-baseline", ["algorithms.selective_backprop.selection=best"])
    # top-k is the default: beta, the probabilistic rule's argument, is refused, not ignored
    with pytest.raises(ConfigError, match="algorithms.selective_backprop: .*beta applies to"):
        load_config("shapes2d-baseline", ["algorithms.selective_backprop.beta=2"])


def pixel_rewriters():
    """The built-in algorithms that rewrite the pixels of image batches after the data loader
    (mix, erase, augment, resize), read from their own declarations. channels_last writes the
    inputs too, but only their memory layout, so the selection need not precede it."""
    names = set()
    for name in ALGORITHMS.names():
        cls = ALGORITHMS.get(name)
        if name == "channels_last" or not cls.__module__.startswith("speedup.algorithms."):
            continue
        decl = cls().declare()
        access = decl.events.get(Event.AFTER_DATALOADER)
        if access and "batch.inputs" in access.writes and "image" in (decl.data_kinds or ()):
            names.add(name)
    return names


def test_declaration_runs_before_batch_augmentations():
    decl = SelectiveBackprop().declare()
    access = decl.events[Event.AFTER_DATALOADER]
    assert access.writes == {"batch"} and {"batch", "model.weights"} <= access.reads
    # it ranks the clean, full-resolution batch: before each of them, and nothing else
    assert decl.runs_before == pixel_rewriters()
    assert len(decl.runs_before) == 7
    assert decl.runs_after == {"seq_length_warmup", "alibi"}
    assert decl.model_kinds is None and decl.data_kinds is None
    algorithms = [ProgressiveResizing(), SelectiveBackprop()]
    plan = plan_of(algorithms, "cnn", "image")
    assert plan.conflicts == []
    assert plan.order[Event.AFTER_DATALOADER] == ["selective_backprop", "progressive_resizing"]


def test_selection_on_a_language_model_keeps_whole_sequences():
    from speedup.models import language as L

    torch.manual_seed(0)
    model = L.gpt2(text_info(8, 32))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32, (8, 8), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loader = TensorBatchLoader(data, 4, shuffle=True, drop_last=True, seed=0)
    sizes = BatchSizes()
    algorithm = SelectiveBackprop(start="0ba", end="2ba", selection="topk", keep=0.5, interval=1)
    trainer = Trainer(model, loader, "2ba", algorithms=[algorithm], callbacks=[sizes])
    trainer.fit()
    assert sizes.sizes == {0: 2, 1: 2}
    assert trainer.state.timestamp.token == 2 * 2 * 8  # tokens of the kept sequences
    assert math.isfinite(float(trainer.state.train_metrics["loss"]))
