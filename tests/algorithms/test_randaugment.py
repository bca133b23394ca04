import math

import pytest
import torch
from conftest import SeenInputs, bad_arguments_test, fit_small_cnn, random_images
from speedup.algorithms.randaugment import (
    AUGMENTATION_SETS,
    MAX_ENHANCE,
    MAX_TRANSLATE,
    OPS,
    RandAugment,
    apply_op,
    augmentation_ops,
    from_unit,
    randaugment_batch,
    to_unit,
)

from speedup.data import TensorBatchLoader
from speedup.event import Event


def unit_images(n=4, size=16, seed=0, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 3, size, size, generator=g)


LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


# -- the operations, in the unit range ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("level", [0.0, 0.5, 1.0])
def test_every_operation_keeps_shape_and_the_unit_range(name, level):
    u = unit_images()
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    out = apply_op(u, name, level, sign)
    assert out.shape == u.shape and out.dtype == u.dtype
    assert out.min() >= 0 and out.max() <= 1


def test_translate_moves_content_by_whole_pixels_and_fills_the_gap():
    u = unit_images(n=1, size=20)
    level = 3 / (20 * MAX_TRANSLATE)  # three pixels
    out = apply_op(u, "translate_x", level, 1.0, fill=0.25)
    torch.testing.assert_close(out[..., :, :17], u[..., :, 3:], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[..., :, 17:], torch.full_like(out[..., :, 17:], 0.25))
    down = apply_op(u, "translate_y", level, -1.0, fill=0.0)
    torch.testing.assert_close(down[..., 3:, :], u[..., :17, :], rtol=0, atol=1e-5)


def centred_grid(size=17):
    """Pixel coordinates ``(x, y)`` from the image centre."""
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(offsets, offsets, indexing="ij")
    return xx, yy


def ramp(x, y):
    """A linear image, on which bilinear resampling is exact: a warped ramp is the ramp at the
    warped coordinates."""
    return (0.5 + 0.02 * x + 0.01 * y).expand(1, 3, *x.shape)


def test_rotation_and_shear_sample_where_the_affine_map_says():
    xx, yy = centred_grid()
    centre = (xx.abs() <= 5) & (yy.abs() <= 5)  # maps stay inside the image here
    for sign in (1.0, -1.0):
        angle = math.radians(30 * sign)  # level 1 is 30 degrees
        rotated = apply_op(ramp(xx, yy), "rotate", 1.0, sign)
        expected = ramp(
            math.cos(angle) * xx - math.sin(angle) * yy,
            math.sin(angle) * xx + math.cos(angle) * yy,
        )
        torch.testing.assert_close(rotated[..., centre], expected[..., centre], rtol=0, atol=1e-5)
    sheared = apply_op(ramp(xx, yy), "shear_x", 0.5, -1.0)  # shear 0.15
    expected = ramp(xx - 0.15 * yy, yy)
    torch.testing.assert_close(sheared[..., centre], expected[..., centre], rtol=0, atol=1e-5)
    sheared = apply_op(ramp(xx, yy), "shear_y", 1.0, 1.0)  # shear 0.3
    expected = ramp(xx, yy + 0.3 * xx)
    torch.testing.assert_close(sheared[..., centre], expected[..., centre], rtol=0, atol=1e-5)


def test_rotation_keeps_a_centred_disk_and_fills_the_corners():
    xx, yy = centred_grid()
    radius = (xx**2 + yy**2).sqrt()
    disk = (radius <= 5).float().expand(1, 3, 17, 17)
    rotated = apply_op(disk, "rotate", 1.0, 1.0, fill=0.75)
    inner = radius <= 3.5
    assert torch.equal(rotated[..., inner], disk[..., inner])  # a disk is rotation invariant
    assert torch.allclose(rotated[..., 0, 0], torch.tensor(0.75))  # a corner came from outside


def test_solarize_posterize_and_autocontrast():
    u = unit_images()
    assert torch.equal(apply_op(u, "solarize", 0.0), u)  # threshold above white
    torch.testing.assert_close(apply_op(u, "solarize", 1.0), 1 - u)  # everything inverted
    half = apply_op(u, "solarize", 0.5)
    above = u >= 128 / 255
    torch.testing.assert_close(half[above], 1 - u[above])
    assert torch.equal(half[~above], u[~above])
    four_bits = apply_op(u, "posterize", 1.0)
    assert four_bits.unique().numel() <= 16
    torch.testing.assert_close(four_bits * 255 / 16, (four_bits * 255 / 16).round())
    low_contrast = 0.3 + 0.2 * u
    stretched = apply_op(low_contrast, "autocontrast", 0.0)
    assert torch.equal(stretched.amin(dim=(2, 3)), torch.zeros(4, 3))
    assert torch.equal(stretched.amax(dim=(2, 3)), torch.ones(4, 3))


def test_equalize_spreads_a_low_contrast_image_into_a_flat_histogram():
    dull = unit_images(n=2, size=32, low=0.1, high=0.4)
    out = apply_op(dull, "equalize", 0.0)
    assert out.min() == 0 and out.max() == 1
    assert out.mean().item() == pytest.approx(0.5, abs=0.01)
    levels = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    quantiles = torch.quantile(out[0, 0].flatten(), levels)
    torch.testing.assert_close(quantiles, levels, atol=0.02, rtol=0)
    flat = torch.full((1, 3, 8, 8), 0.4)
    assert torch.equal(apply_op(flat, "equalize", 0.0), flat)  # nothing to equalise


def test_enhancements_blend_towards_their_degenerate_image():
    u = unit_images(low=0.3, high=0.6)  # no clipping at these factors
    factor = 1 + MAX_ENHANCE * 0.5
    torch.testing.assert_close(apply_op(u, "brightness", 0.5, 1.0), factor * u)
    color = apply_op(u, "color", 0.5, -1.0)
    gray = (u * LUMA).sum(1, keepdim=True)
    torch.testing.assert_close((color * LUMA).sum(1, keepdim=True), gray)  # luma is kept
    torch.testing.assert_close(color - gray, (2 - factor) * (u - gray))
    contrast = apply_op(u, "contrast", 0.5, 1.0)
    mean = gray.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(contrast, mean + factor * (u - mean))
    sharp = apply_op(u, "sharpness", 0.5, 1.0)
    assert torch.equal(sharp[..., 0, :], u[..., 0, :])  # borders are kept, as PIL does
    assert not torch.allclose(sharp[..., 1:-1, 1:-1], u[..., 1:-1, 1:-1])
    flat = torch.full((1, 3, 8, 8), 0.5)
    torch.testing.assert_close(apply_op(flat, "sharpness", 1.0, 1.0), flat)


def test_unit_range_round_trip_and_fill():
    x = torch.randn(8, 3, 6, 6)
    unit, mapping = to_unit(x)
    torch.testing.assert_close(unit.amin(dim=(0, 2, 3)), torch.zeros(3))
    torch.testing.assert_close(unit.amax(dim=(0, 2, 3)), torch.ones(3))
    torch.testing.assert_close(from_unit(unit, mapping), x)
    unit, mapping = to_unit(x, value_range=(-4.0, 4.0))
    torch.testing.assert_close(unit, (x + 4) / 8)


# -- the policy --------------------------------------------------------------------------------


def test_operation_sets():
    assert augmentation_ops("all", with_identity=True)[0] == "identity"
    assert len(augmentation_ops("all", with_identity=True)) == 14  # the paper's list
    assert set(AUGMENTATION_SETS["all"]) - set(AUGMENTATION_SETS["safe"]) == {
        "color",
        "contrast",
        "brightness",
        "sharpness",
    }
    assert augmentation_ops("rotate, solarize") == ("rotate", "solarize")
    with pytest.raises(ValueError, match="augmentation_set 'spin'"):
        augmentation_ops("spin")


def test_each_image_draws_its_own_operations_at_the_fixed_magnitude():
    x = (unit_images(n=1) * 2 - 1).expand(64, 3, 16, 16).contiguous()  # 64 copies, range [-1, 1]
    out = randaugment_batch(
        x, depth=1, severity=10, augmentation_set="brightness", value_range=(-1.0, 1.0)
    )
    unit, result = (x + 1) / 2, (out + 1) / 2
    brighter = (unit * (1 + MAX_ENHANCE)).clamp(0, 1)
    darker = unit * (1 - MAX_ENHANCE)
    is_brighter = torch.isclose(result, brighter, atol=1e-5).flatten(1).all(1)
    is_darker = torch.isclose(result, darker, atol=1e-5).flatten(1).all(1)
    assert torch.all(is_brighter ^ is_darker)  # one of the two signs, never in between
    assert 10 < is_brighter.sum() < 54


def test_identity_draws_return_the_images_bit_for_bit():
    x = torch.randn(16, 3, 8, 8)
    assert torch.equal(randaugment_batch(x, 2, 9, "identity"), x)
    out = randaugment_batch(x, 1, 9, "all", generator=torch.Generator().manual_seed(0))
    unchanged = (out == x).flatten(1).all(1)
    assert 0 < unchanged.sum() < 16  # about 1 in 14 draws identity
    zero = randaugment_batch(x, 2, 0, "rotate,shear_x,translate_y,brightness")
    torch.testing.assert_close(zero, x, atol=1e-5, rtol=0)  # severity 0: no change


def test_results_stay_in_the_batch_range_and_repeat_with_a_generator():
    x = torch.randn(32, 3, 12, 12)
    a = randaugment_batch(x, 3, 9, generator=torch.Generator().manual_seed(0))
    b = randaugment_batch(x, 3, 9, generator=torch.Generator().manual_seed(0))
    c = randaugment_batch(x, 3, 9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    low, high = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
    assert torch.all(a.amin(dim=(0, 2, 3)) >= low - 1e-5)
    assert torch.all(a.amax(dim=(0, 2, 3)) <= high + 1e-5)
    half = randaugment_batch(x.to(torch.bfloat16), 2, 9)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    RandAugment,
    [
        ({"depth": 0}, "randaugment.depth must be an integer >= 1, got 0"),
        ({"severity": 11}, r"randaugment.severity must be in \[0, 10\], got 11"),
        ({"augmentation_set": "spin"}, "randaugment.augmentation_set 'spin'"),
    ],
)


def test_declaration():
    declared = RandAugment().declare()
    assert set(declared.events) == {Event.AFTER_DATALOADER}
    assert declared.events[Event.AFTER_DATALOADER].writes == {"batch.inputs"}
    assert declared.runs_after == {"selective_backprop"}
    assert {"augmix", "cutout", "colout", "mixup", "cutmix", "progressive_resizing"} == set(
        declared.runs_before
    )
    assert declared.data_kinds == {"image"}


# -- in a run ---------------------------------------------------------------------------------


def image_data(n=32, size=12, seed=0):
    return random_images(n, size, 10, seed)


def train(steps, callbacks=(), checkpoint=None, save_to=None, eval_data=None):
    algorithm = RandAugment(depth=2, severity=9)
    return fit_small_cnn(
        image_data(), algorithm, steps, callbacks, eval_data, checkpoint=checkpoint, save_to=save_to
    )


def test_twenty_steps_train_on_augmented_images_and_eval_is_clean():
    seen = SeenInputs()
    eval_data = image_data(n=16, seed=1)
    train(20, [seen], eval_data=eval_data)
    assert len(seen.losses) == 20 and all(torch.isfinite(loss) for loss in seen.losses)
    clean = TensorBatchLoader(image_data(), 8, shuffle=True, drop_last=True)
    clean.set_epoch(0)
    for batch, inputs in zip(clean, seen.train):
        changed = (inputs != batch["inputs"]).flatten(1).any(1)
        assert changed.float().mean() > 0.8  # most images drew at least one real operation
    assert seen.eval and all(torch.equal(inputs, eval_data["inputs"]) for inputs in seen.eval)


def test_a_resumed_run_augments_exactly_as_an_uninterrupted_one(tmp_path):
    full, resumed = SeenInputs(), SeenInputs()
    train(6, [full])
    path = train(3, save_to=tmp_path)
    train(6, [resumed], checkpoint=path)
    assert len(resumed.train) == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed.train, full.train[3:]))
