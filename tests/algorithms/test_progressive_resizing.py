import pytest
import torch
import torch.nn.functional as F
from conftest import bad_arguments_test, make_blobs
from speedup.algorithms.progressive_resizing import (
    INTERPOLATIONS,
    ProgressiveResizing,
    resize_batch,
    resizing_scale,
    rounded_size,
)

from speedup.callback import Callback
from speedup.config import ConfigError, load_config
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
    with pytest.raises(ValueError, match="interpolation must be one of nearest, bilinear"):
        resize_batch(images, 16, interpolation="cubic")


def nearest_multiple(value, increment):
    """The multiple of ``increment`` closest to ``value``, the larger one on a tie: a search
    over candidates, independent of rounded_size's arithmetic."""
    candidates = [increment * k for k in range(0, int(value // increment) + 3)]
    return min(candidates, key=lambda m: (abs(m - value), -m))


def test_sizes_round_to_the_nearest_increment_within_bounds():
    # 0.55 * 32 = 17.6 -> 16 (floor and nearest agree); 0.57 * 32 = 18.24 -> 20 (floor: 16);
    # 0.5625 * 32 = 18 is a tie between 16 and 20 -> 20; 0.99 * 32 = 31.68 -> 32 (floor: 28)
    assert [rounded_size(32, s, 4) for s in (0.55, 0.57, 0.5625, 0.99)] == [16, 20, 20, 32]
    assert rounded_size(32, 0.05, 4) == 4  # never below one increment
    assert rounded_size(8, 0.5, 16) == 8  # nor above the full size
    assert rounded_size(30, 0.5, 1) == 15
    for full, increment in ((32, 4), (64, 8), (224, 32), (30, 4)):
        for step in range(101):
            scale = 0.2 + 0.8 * step / 100
            expected = min(full, max(increment, nearest_multiple(full * scale, increment)))
            assert rounded_size(full, scale, increment) == expected, (full, increment, scale)


def test_interpolations_match_their_definitions():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    # nearest: the source pixel whose centre is nearest, floor((i + 0.5) * in / out)
    assert torch.equal(resize_batch(images, 16, interpolation="nearest"), images[..., 1::2, 1::2])
    rows = [int((i + 0.5) * 32 / 20) for i in range(20)]
    assert torch.equal(
        resize_batch(images, 20, interpolation="nearest"), images[..., rows, :][..., rows]
    )
    # plain bilinear at half size samples between four pixels: their mean
    torch.testing.assert_close(
        resize_batch(images, 16, interpolation="bilinear"), F.avg_pool2d(images, 2)
    )
    # antialiased bilinear at half size is the triangle filter stretched by 2: [1, 3, 3, 1] / 8
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64) / 8
    kernel = (taps[:, None] * taps[None, :]).expand(3, 1, 4, 4)
    reference = F.conv2d(images, kernel, stride=2, padding=1, groups=3)
    smoothed = resize_batch(images, 16, interpolation="bilinear_antialias")
    torch.testing.assert_close(smoothed[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1])
    assert set(INTERPOLATIONS) == {"nearest", "bilinear", "bilinear_antialias"}


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
        expected.append(max(4, min(32, nearest_multiple(32 * scale, 4))))
    assert sizes.train == expected
    # step 15: scale 0.625, 20 px exactly; step 25: 0.875, 28 px; step 13: 0.575, 18.4 -> 20
    assert sizes.train[0] == 16 and sizes.train[15] == 20 and sizes.train[25] == 28
    assert sizes.train[13] == 20 and sizes.train[12] == 16
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


test_bad_arguments_name_the_key = bad_arguments_test(
    ProgressiveResizing,
    [
        ({"initial_scale": 0}, r"progressive_resizing.initial_scale must be in \(0, 1\]"),
        ({"mode": "crop", "resize_targets": True}, "resize_targets needs mode 'resize'"),
        ({"interpolation": "cubic"}, "interpolation must be one of nearest, bilinear, bilinear_"),
        ({"finetune": "1.5dur"}, r"progressive_resizing.finetune must be at most .*got 1.5dur"),
        ({"delay": "1.2dur", "finetune": "0dur"}, r"progressive_resizing.delay must be at most"),
        (
            {"delay": "0.6dur", "finetune": "0.5dur"},
            r"delay \+ finetune must be at most the whole run \(1dur\), got 0.6dur \+ 0.5dur",
        ),
        ({"delay": "10sec"}, "progressive_resizing.delay.*wall-clock"),
    ],
)


def test_a_schedule_filling_the_run_exactly_is_allowed():
    assert ProgressiveResizing(delay="0.8dur", finetune="0.2dur").finetune.value == 0.2
    assert ProgressiveResizing(delay="1dur", finetune="0dur").delay.value == 1.0


def test_a_recipe_with_an_impossible_schedule_fails_at_validation():
    key = "algorithms.progressive_resizing"
    with pytest.raises(ConfigError, match=rf"{key}: progressive_resizing.finetune must be"):
        load_config("shapes2d-progressive-resizing", [f"{key}.finetune=1.5dur"])
    # the recipe's finetune is 0.2dur: a delay of 0.9dur leaves no room for it
    with pytest.raises(ConfigError, match=rf"{key}: .*delay \+ finetune .* 0.9dur \+ 0.2dur"):
        load_config("shapes2d-progressive-resizing", [f"{key}.delay=0.9dur"])


def test_a_schedule_in_batches_longer_than_the_run_fails_before_training():
    sizes = Sizes()
    trainer = Trainer(
        Classifier(SmallCNN2d(3, 10, channels=4), 10),
        TensorBatchLoader(image_data(n=32), 8, shuffle=True, drop_last=True),
        "20ba",
        algorithms=[ProgressiveResizing(delay="15ba", finetune="10ba")],
        callbacks=[sizes],
        data_kind="image",
    )
    message = (
        r"algorithms.progressive_resizing.delay \+ finetune must be at most the whole run "
        r"\(1dur\), got 0.75dur \+ 0.5dur = 1.25dur \(15ba and 10ba in this run\)"
    )
    with pytest.raises(ConfigError, match=message):
        trainer.fit()
    assert sizes.train == []  # nothing was trained
