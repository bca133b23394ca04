import math

import pytest
import torch
from conftest import plan_of, random_images
from speedup.algorithms.cutmix import CutMix, cutmix_batch, cutmix_box
from speedup.algorithms.label_smoothing import LabelSmoothing
from speedup.algorithms.mixup import mix_targets

from speedup.callback import Callback
from speedup.data import TensorBatchLoader
from speedup.event import Event
from speedup.models import Classifier
from speedup.models.nets import SmallCNN2d
from speedup.trainer import Trainer

CLASSES = 10


def images(n=32, size=12, seed=0):
    return random_images(n, size, CLASSES, seed)


def pasted_box(mixed, inputs, permutation):
    """The rectangle where ``mixed`` differs from ``inputs`` (over images with a partner)."""
    moved = permutation != torch.arange(len(permutation))
    changed = (mixed != inputs)[moved].any(dim=0).any(dim=0)  # [H, W]
    rows, cols = changed.any(dim=1).nonzero().flatten(), changed.any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        return changed, 0, 0, 0, 0
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    return changed, int(top), int(bottom), int(left), int(right)


# -- the math ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_the_box_comes_from_the_partner_and_lambda_is_its_complement_area(seed):
    data = images(n=16)
    x, y = data["inputs"], data["targets"]
    out = cutmix_batch(x, y, CLASSES, alpha=1.0, generator=torch.Generator().manual_seed(seed))
    changed, top, bottom, left, right = pasted_box(out.inputs, x, out.permutation)
    assert changed.sum() == (bottom - top) * (right - left)  # a filled rectangle
    assert out.lam == pytest.approx(1 - (bottom - top) * (right - left) / (12 * 12))
    inside = (..., slice(top, bottom), slice(left, right))
    assert torch.equal(out.inputs[inside], x[out.permutation][inside])
    outside = out.inputs.clone()
    outside[inside] = x[inside]
    assert torch.equal(outside, x)  # nothing else changed
    torch.testing.assert_close(out.targets, mix_targets(y, y[out.permutation], out.lam, CLASSES))
    torch.testing.assert_close(out.targets.sum(-1), torch.ones(16))


def test_box_sides_follow_lambda_and_are_clipped_at_the_border():
    g = torch.Generator().manual_seed(0)
    sides = int(16 * math.sqrt(1 - 0.75))  # 8 for lam 0.75
    interior = 0
    for _ in range(200):
        top, bottom, left, right = cutmix_box(16, 20, 0.75, g)
        assert 0 <= top <= bottom <= 16 and 0 <= left <= right <= 20
        assert bottom - top <= sides and right - left <= int(20 * 0.5)
        if 0 < top and bottom < 16 and 0 < left and right < 20:
            interior += 1
            assert (bottom - top, right - left) == (sides, 10)
    assert 0 < interior < 200  # both whole and clipped boxes occur
    assert cutmix_box(16, 16, 1.0, g)[:2] in {(t, t) for t in range(17)}  # lam 1: empty box
    with pytest.raises(ValueError, match="lam"):
        cutmix_box(16, 16, 1.5)


def test_clipping_raises_the_corrected_lambda_above_the_drawn_one():
    g = torch.Generator().manual_seed(0)
    x, y = images(n=4)["inputs"], images(n=4)["targets"]
    lams = [cutmix_batch(x, y, CLASSES, generator=g).lam for _ in range(400)]
    assert sum(lams) / len(lams) > 0.55  # Beta(1, 1) has mean 0.5; clipped boxes are smaller


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="cutmix.alpha must be > 0, got -1"):
        CutMix(alpha=-1)
    with pytest.raises(ValueError, match=r"images \[N, C, H, W\]"):
        cutmix_batch(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), CLASSES)
    with pytest.raises(ValueError, match="class-index targets"):
        cutmix_batch(torch.randn(4, 3, 8, 8), torch.zeros(4, 8, 8, dtype=torch.long), CLASSES)


def test_declaration():
    declared = CutMix().declare()
    assert declared.incompatible_with == {"mixup"}
    assert {"colout", "cutout", "randaugment", "augmix"} <= declared.runs_after
    assert {"progressive_resizing", "label_smoothing"} <= declared.runs_before
    assert declared.data_kinds == {"image"}
    algorithms = [LabelSmoothing(), CutMix()]
    plan = plan_of(algorithms, data_kind="image")
    assert plan.conflicts == [] and plan.order[Event.BEFORE_LOSS] == ["cutmix", "label_smoothing"]


# -- in a run ---------------------------------------------------------------------------------


class Taps(Callback):
    def __init__(self, cutmix):
        self.cutmix = cutmix
        self.inputs, self.mixes, self.at_loss, self.after, self.losses = [], [], [], [], []

    def before_forward(self, state, logger):
        self.inputs.append(state.batch["inputs"].clone())
        self.mixes.append((self.cutmix.lam, self.cutmix.permutation.clone()))

    def before_loss(self, state, logger):
        self.at_loss.append(state.batch["targets"].clone())

    def before_backward(self, state, logger):
        self.losses.append(state.loss.detach())

    def after_backward(self, state, logger):
        self.after.append(state.batch["targets"].clone())


def test_twenty_steps_paste_boxes_and_mix_the_labels_by_area():
    data = images(n=32)
    train = TensorBatchLoader(data, 8, shuffle=True, drop_last=True, seed=0)
    cutmix = CutMix()
    taps = Taps(cutmix)
    torch.manual_seed(0)
    Trainer(
        Classifier(SmallCNN2d(3, CLASSES, channels=4), CLASSES),
        train,
        "20ba",
        algorithms=[cutmix],
        callbacks=[taps],
        data_kind="image",
    ).fit()
    assert len(taps.losses) == 20 and all(torch.isfinite(loss) for loss in taps.losses)
    clean = TensorBatchLoader(data, 8, shuffle=True, drop_last=True, seed=0)
    clean.set_epoch(0)
    pasted = 0
    for batch, seen, (lam, perm), at_loss, after in zip(
        clean, taps.inputs, taps.mixes, taps.at_loss, taps.after
    ):
        _, top, bottom, left, right = pasted_box(seen, batch["inputs"], perm)
        assert lam == pytest.approx(1 - (bottom - top) * (right - left) / 144)
        y = batch["targets"]
        torch.testing.assert_close(at_loss, mix_targets(y, y[perm], lam, CLASSES))
        assert torch.equal(after, y)  # class indices again after the loss
        pasted += lam < 1
    assert pasted >= 3  # the four batches of the first epoch are mostly boxed
