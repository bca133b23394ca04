import pytest
import torch
import torch.nn.functional as F
from conftest import fit_small_cnn, plan_of, random_images, stand_in
from speedup.algorithms.augmix import AugMix
from speedup.algorithms.colout import ColOut
from speedup.algorithms.cutmix import CutMix
from speedup.algorithms.cutout import CutOut
from speedup.algorithms.label_smoothing import LabelSmoothing, smooth_labels
from speedup.algorithms.mixup import (
    AUGMENTATION_ORDER,
    MixUp,
    mix_targets,
    mixup_batch,
    sample_beta,
    sample_dirichlet,
)
from speedup.algorithms.progressive_resizing import ProgressiveResizing
from speedup.algorithms.randaugment import RandAugment

from speedup.algorithm import Access
from speedup.callback import Callback
from speedup.data import TensorBatchLoader
from speedup.event import Event
from speedup.models import Classifier
from speedup.models.base import soft_cross_entropy
from speedup.models.nets import SmallCNN2d
from speedup.trainer import Trainer

CLASSES = 10


def images(n=32, size=8, seed=0):
    return random_images(n, size, CLASSES, seed)


def cnn():
    torch.manual_seed(0)
    return Classifier(SmallCNN2d(3, CLASSES, channels=4), CLASSES)


def loader(data, batch_size=8):
    return TensorBatchLoader(data, batch_size, shuffle=True, drop_last=True, seed=0)


def clean_batches(data, batch_size=8):
    """The batches of epoch 0 exactly as the trainer draws them."""
    source = loader(data, batch_size)
    source.set_epoch(0)
    return list(source)


class Taps(Callback):
    """Records, per microbatch, what the model and the loss saw."""

    def __init__(self, mixup=None):
        self.mixup = mixup
        self.inputs, self.at_loss, self.restored, self.losses = [], [], [], []
        self.outputs, self.after, self.mixes, self.eval_inputs = [], [], [], []

    def before_forward(self, state, logger):
        self.inputs.append(state.batch["inputs"].clone())
        if self.mixup is not None:
            self.mixes.append((self.mixup.lam, self.mixup.permutation.clone()))

    def before_loss(self, state, logger):  # after every algorithm's BEFORE_LOSS
        self.at_loss.append(state.batch["targets"].clone())
        self.outputs.append(state.outputs.detach().clone())

    def after_loss(self, state, logger):
        self.restored.append(state.batch["targets"].clone())

    def before_backward(self, state, logger):
        self.losses.append(state.loss.detach().clone())

    def after_backward(self, state, logger):
        self.after.append(state.batch["targets"].clone())

    def eval_before_forward(self, state, logger):
        self.eval_inputs.append(state.batch["inputs"].clone())


# -- the math ---------------------------------------------------------------------------------


def test_mixup_batch_is_the_stated_convex_combination():
    data = images(n=16)
    x, y = data["inputs"], data["targets"]
    out = mixup_batch(x, y, CLASSES, alpha=0.4, generator=torch.Generator().manual_seed(3))
    lam, perm = out.lam, out.permutation
    assert 0.0 < lam < 1.0
    assert torch.equal(perm.sort().values, torch.arange(16))
    torch.testing.assert_close(out.inputs, lam * x + (1 - lam) * x[perm], rtol=0, atol=1e-6)
    expected = lam * F.one_hot(y, CLASSES) + (1 - lam) * F.one_hot(y[perm], CLASSES)
    torch.testing.assert_close(out.targets, expected.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.targets.sum(-1), torch.ones(16))
    # the weight of each example's own class is lam (plus 1 - lam where the partner agrees)
    own = out.targets.gather(1, y[:, None]).squeeze(1)
    same = y == y[perm]
    torch.testing.assert_close(own[~same], torch.full_like(own[~same], lam))
    torch.testing.assert_close(own[same], torch.ones_like(own[same]))


def test_soft_targets_are_mixed_as_probabilities():
    a = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(
        mix_targets(a, b, 0.25, 3), torch.tensor([[0.175, 0.825, 0.0], [0.375, 0.375, 0.25]])
    )


def test_a_seeded_generator_repeats_the_mix():
    data = images(n=8)
    a = mixup_batch(**data, num_classes=CLASSES, generator=torch.Generator().manual_seed(1))
    b = mixup_batch(**data, num_classes=CLASSES, generator=torch.Generator().manual_seed(1))
    c = mixup_batch(**data, num_classes=CLASSES, generator=torch.Generator().manual_seed(2))
    assert a.lam == b.lam and torch.equal(a.inputs, b.inputs)
    assert a.lam != c.lam


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_lambda_follows_beta_alpha_alpha(alpha):
    draws = sample_beta(alpha, alpha, (40_000,), torch.Generator().manual_seed(0))
    assert draws.min() >= 0 and draws.max() <= 1
    assert draws.mean().item() == pytest.approx(0.5, abs=0.01)
    assert draws.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)
    if alpha == 0.2:  # U-shaped: most mass near 0 and 1
        assert ((draws < 0.1) | (draws > 0.9)).float().mean() > 0.5


def test_dirichlet_rows_sum_to_one_with_the_right_mean():
    draws = sample_dirichlet(torch.full((20_000, 4), 0.5), torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws.sum(-1), torch.ones(20_000, dtype=torch.float64))
    torch.testing.assert_close(
        draws.mean(0), torch.full((4,), 0.25, dtype=torch.float64), atol=0.01, rtol=0
    )


# -- arguments and declaration -----------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0, -1, float("nan")])
def test_bad_alpha_is_rejected_naming_the_argument(alpha):
    with pytest.raises(ValueError, match="mixup.alpha must be > 0"):
        MixUp(alpha=alpha)


def test_targets_that_are_not_class_labels_are_rejected():
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"class-index targets \[N\] or probabilities \[N, K\]"):
        mixup_batch(x, torch.zeros(4, 8, 8, dtype=torch.long), CLASSES)
    with pytest.raises(ValueError, match="class-index"):
        mixup_batch(x, torch.zeros(4), CLASSES)  # float regression targets


@pytest.mark.parametrize("reverse", [False, True])
def test_the_augmentations_plan_in_one_fixed_order_whatever_the_recipe_order(reverse):
    algorithms = [
        ProgressiveResizing(),
        MixUp(),
        LabelSmoothing(),
        CutOut(),
        ColOut(),
        AugMix(),
        stand_in(
            "selective_backprop",
            {Event.AFTER_DATALOADER: Access(reads={"batch"}, writes={"batch"})},
        ),
        RandAugment(),
    ]
    if reverse:
        algorithms.reverse()
    plan = plan_of(algorithms, "cnn", "image")
    assert plan.conflicts == []
    order = plan.order[Event.AFTER_DATALOADER]
    # the one table's order, whatever the recipe's; cutmix is not in this recipe
    assert order == [name for name in AUGMENTATION_ORDER if name != "cutmix"]
    # pinned as the design fixes it, so that a change to the table is a change to this test
    assert " < ".join(order) == (
        "selective_backprop < randaugment < augmix < cutout < colout < mixup < progressive_resizing"
    )
    # and the table's order is the design's: the selection ranks the clean batch, ColOut
    # shrinks what the per-image ops left, mixing sees the final pixels, resizing is last
    assert order[0] == "selective_backprop" and order[-1] == "progressive_resizing"
    assert order.index("colout") > max(map(order.index, ["randaugment", "augmix", "cutout"]))
    assert order.index("mixup") == order.index("colout") + 1
    assert plan.order[Event.BEFORE_LOSS] == ["mixup", "label_smoothing"]
    assert plan.order[Event.BEFORE_BACKWARD] == ["mixup"]


def test_the_whole_stack_composes_in_a_run():
    taps = Taps()
    algorithms = [
        MixUp(),
        LabelSmoothing(),
        ProgressiveResizing(delay="0ba", finetune="0ba", initial_scale=0.5, size_increment=2),
        ColOut(p_row=0.25, p_col=0.25),
        CutOut(length=0.25),
        AugMix(),
        RandAugment(),
    ]
    Trainer(
        cnn(),
        loader(images(n=16, size=16)),
        "4ba",
        algorithms=algorithms,
        callbacks=[taps],
        microbatch_size=4,
        data_kind="image",
    ).fit()
    assert all(torch.isfinite(loss) for loss in taps.losses) and len(taps.losses) == 8
    # ColOut leaves 12 of 16 pixels a side; progressive resizing then scales that by 0.5,
    # 0.625, 0.75, 0.875 (a linear ramp over the 4 batches), rounded to the nearest even size
    # (6, 7.5, 9, 10.5 -> 6, 8, 10, 10; halves go up)
    assert [tuple(x.shape[-2:]) for x in taps.inputs[::2]] == [(6, 6), (8, 8), (10, 10), (10, 10)]
    assert all(t.dtype == torch.float32 and t.shape == (4, CLASSES) for t in taps.at_loss)


def test_mixup_and_cutmix_are_declared_incompatible_and_image_only():
    algorithms = [MixUp(), CutMix()]
    plan = plan_of(algorithms, data_kind="text")
    kinds = sorted(c.kind for c in plan.conflicts)
    assert kinds == ["incompatible", "not-applicable", "not-applicable"]
    assert "mixup and cutmix are declared incompatible" in str(plan.conflicts)
    declared = MixUp().declare()
    assert declared.events[Event.AFTER_DATALOADER].writes == {"batch.inputs"}
    assert declared.events[Event.BEFORE_LOSS].reads == {"batch.targets", "outputs"}
    assert declared.events[Event.BEFORE_BACKWARD].writes == {"batch.targets"}


# -- in a run ---------------------------------------------------------------------------------


def test_twenty_steps_train_on_mixed_inputs_and_eval_is_clean():
    data = images(n=32)
    evaluation = TensorBatchLoader(images(n=16, seed=1), 8)
    mixup = MixUp(alpha=1.0)
    taps = Taps(mixup)
    trainer = Trainer(
        cnn(),
        loader(data),
        "20ba",
        eval_dataloader=evaluation,
        algorithms=[mixup],
        callbacks=[taps],
        optimizer={"name": "sgd", "lr": 0.05},
        data_kind="image",
    )
    metrics = trainer.fit()
    assert all(torch.isfinite(loss) for loss in taps.losses) and len(taps.losses) == 20
    assert 0 <= metrics["accuracy"] <= 1
    clean = clean_batches(data)
    for seen, batch, (lam, perm) in zip(taps.inputs[:4], clean, taps.mixes[:4]):
        expected = torch.lerp(batch["inputs"][perm], batch["inputs"], lam)
        torch.testing.assert_close(seen, expected, rtol=0, atol=1e-6)
        assert not torch.equal(seen, batch["inputs"])
    assert len({lam for lam, _ in taps.mixes}) == 20  # a fresh lam every batch
    for seen, batch in zip(taps.eval_inputs, evaluation):
        assert torch.equal(seen, batch["inputs"])  # eval is never mixed
    for targets in taps.after:  # class indices again once the loss is computed
        assert targets.dtype == torch.long and targets.dim() == 1


def test_label_smoothing_smooths_the_mixed_targets_per_microbatch_and_targets_come_back():
    data = images(n=16)
    mixup = MixUp(alpha=0.4)
    taps = Taps(mixup)
    Trainer(
        cnn(),
        loader(data),
        "2ba",
        algorithms=[LabelSmoothing(alpha=0.2), mixup],  # recipe order does not matter
        callbacks=[taps],
        optimizer={"name": "sgd", "lr": 0.0},
        microbatch_size=4,
        data_kind="image",
    ).fit()
    assert len(taps.at_loss) == 4  # two batches of two microbatches
    for b, batch in enumerate(clean_batches(data)):
        lam, perm = taps.mixes[2 * b]
        y = batch["targets"]
        mixed = mix_targets(y, y[perm], lam, CLASSES)
        smoothed = smooth_labels(mixed, CLASSES, 0.2)
        at_loss = torch.cat(taps.at_loss[2 * b : 2 * b + 2])
        torch.testing.assert_close(at_loss, smoothed)  # the whole batch's mix, split in two
        # label smoothing restores its input (the mix) at AFTER_LOSS, MixUp the labels later
        torch.testing.assert_close(torch.cat(taps.restored[2 * b : 2 * b + 2]), mixed)
        inputs = torch.cat(taps.inputs[2 * b : 2 * b + 2])
        torch.testing.assert_close(inputs, torch.lerp(batch["inputs"][perm], batch["inputs"], lam))
        for m in range(2):
            i = 2 * b + m
            expected = soft_cross_entropy(taps.outputs[i], smoothed[4 * m : 4 * m + 4])
            assert taps.losses[i].item() == pytest.approx(expected.item(), abs=1e-6)
            assert torch.equal(taps.after[i], y[4 * m : 4 * m + 4])


def run(steps, callbacks=(), checkpoint=None, save_to=None):
    algorithm = MixUp(alpha=1.0)
    return fit_small_cnn(
        images(n=32), algorithm, steps, callbacks, checkpoint=checkpoint, save_to=save_to
    )


def test_a_resumed_run_draws_the_same_mixes(tmp_path):
    full = Taps()
    run(6, [full])
    path = run(3, save_to=tmp_path)
    resumed = Taps()
    run(6, [resumed], checkpoint=path)
    assert len(resumed.inputs) == 3
    for a, b in zip(resumed.inputs, full.inputs[3:]):
        assert torch.equal(a, b)
    assert MixUp().state_dict() == {}  # nothing outlives a batch; the RNG is checkpointed
