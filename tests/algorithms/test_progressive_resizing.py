import pytest
import torch
from conftest import make_blobs
from speedup.algorithms.progressive_resizing import (
    ProgressiveResizing,
    resize_batch,
    resizing_scale,
)

from speedup.callback import Callback
from speedup.data import TensorBatchLoader
from speedup.engine import build_plan
from speedup.models import Classifier
from speedup.models.nets import SmallCNN2d
from speedup.trainer import Trainer


def test_scale_schedule_shape():
    # flat at 0.5 until 0.4, linear to 1.0 at 0.8, then 1.0
    assert resizing_scale(0.0, 0.5, 0.4, 0.2) == 0.5
    assert resizing_scale(0.39, 0.5, 0.4, 0.2) == 0.5
    assert resizing_scale(0.6, 0.5, 0.4, 0.2) == pytest.approx(0.75)
    assert resizing_scale(0.8, 0.5, 0.4, 0.2) == 1.0
    assert resizing_scale(0.99, 0.5, 0.4, 0.2) == 1.0


def test_resize_and_crop():
    images = torch.rand(2, 3, 32, 32)
    assert resize_batch(images, 16).shape == (2, 3, 16, 16)
    assert resize_batch(images, 32) is images
    crop = resize_batch(images, 20, mode="crop", generator=torch.Generator().manual_seed(0))
    assert crop.shape == (2, 3, 20, 20)
    # a crop is a window of the original pixels
    found = any(
        torch.equal(images[..., t : t + 20, x : x + 20], crop) for t in range(13) for x in range(13)
    )
    assert found
    with pytest.raises(ValueError, match="mode"):
        resize_batch(images, 16, mode="zoom")


def image_data(n=64, size=32):
    g = torch.Generator().manual_seed(0)
    return {
        "inputs": torch.rand(n, 3, size, size, generator=g),
        "targets": torch.randint(0, 10, (n,), generator=g),
    }


class Sizes(Callback):
    def __init__(self):
        self.train, self.eval = [], []

    def before_forward(self, state, logger):
        self.train.append(state.batch["inputs"].shape[-1])

    def eval_before_forward(self, state, logger):
        self.eval.append(state.batch["inputs"].shape[-1])


def test_resolution_follows_the_schedule_and_eval_is_full_size():
    data = image_data()
    train = TensorBatchLoader(data, 8, shuffle=True, drop_last=True)  # 8 batches / epoch
    evaluation = TensorBatchLoader(data, 32)
    sizes = Sizes()
    algorithm = ProgressiveResizing(
        initial_scale=0.5, delay="0.25dur", finetune="0.25dur", size_increment=4
    )
    Trainer(
        Classifier(SmallCNN2d(3, 10, channels=4), 10),
        train,
        "40ba",
        eval_dataloader=evaluation,
        algorithms=[algorithm],
        callbacks=[sizes],
        eval_interval="10ba",
        data_kind="image",
    ).fit()
    expected = []
    for step in range(40):
        scale = resizing_scale(step / 40, 0.5, 0.25, 0.25)
        expected.append(max(4, min(32, int(32 * scale // 4 * 4))))
    assert sizes.train == expected
    assert sizes.train[0] == 16 and sizes.train[15] == 20 and sizes.train[25] == 28
    assert sizes.train[-10:] == [32] * 10  # the final phase is full resolution
    assert set(sizes.eval) == {32}


def test_times_in_batches_work_like_fractions():
    data = image_data(n=32)
    train = TensorBatchLoader(data, 8, shuffle=True, drop_last=True)
    sizes = Sizes()
    Trainer(
        Classifier(SmallCNN2d(3, 10, channels=4), 10),
        train,
        "20ba",
        algorithms=[ProgressiveResizing(delay="5ba", finetune="5ba")],
        callbacks=[sizes],
        data_kind="image",
    ).fit()
    assert sizes.train[:5] == [16] * 5 and sizes.train[15:] == [32] * 5


def test_not_applicable_to_text_or_mlp():
    decl = ProgressiveResizing().declare()
    plan = build_plan({"progressive_resizing": decl}, model_kind="gpt2", data_kind="text")
    messages = " ".join(str(c) for c in plan.conflicts)
    assert "does not apply to model kind 'gpt2'" in messages
    assert "does not apply to data kind 'text'" in messages
    _ = make_blobs  # the blobs fixture data is 1-D: an MLP on it is not applicable either
    assert build_plan({"p": decl}, model_kind="mlp").conflicts


def test_bad_arguments():
    with pytest.raises(ValueError, match="initial_scale"):
        ProgressiveResizing(initial_scale=0)
    with pytest.raises(ValueError, match="resize_targets"):
        ProgressiveResizing(mode="crop", resize_targets=True)
