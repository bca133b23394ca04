import math

import pytest
import torch
from conftest import SeenInputs, bad_arguments_test, fit_small_cnn
from speedup.algorithms.cutout import CutOut, cutout_batch, hole_side

from speedup.engine import build_plan
from speedup.event import Event


def positive_images(n=64, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.0 + torch.rand(n, 3, size, size, generator=g)  # never equal to the fill 0


def holes_of(out):
    """Per image: the [H, W] mask of filled pixels (every channel must agree)."""
    filled = out == 0
    assert torch.equal(filled, filled[:, :1].expand_as(filled))
    return filled[:, 0]


def bounding_box(mask):
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


# -- the math ---------------------------------------------------------------------------------


def test_one_hole_is_a_square_of_the_given_side_clipped_at_the_border():
    x = positive_images(n=200)
    out = cutout_batch(x, num_holes=1, length=0.25, generator=torch.Generator().manual_seed(0))
    side = 4  # a quarter of 16
    interior = 0
    for image, mask in zip(range(200), holes_of(out)):
        top, bottom, left, right = bounding_box(mask)
        assert mask.sum() == (bottom - top) * (right - left)  # a filled rectangle
        assert bottom - top <= side and right - left <= side
        if 0 < top and bottom < 16 and 0 < left and right < 16:
            interior += 1
            assert (bottom - top, right - left) == (side, side)
        assert torch.equal(out[image][:, ~mask], x[image][:, ~mask])  # the rest is untouched
    assert interior > 60  # about (11/16)**2 of the holes are away from the borders
    positions = {bounding_box(mask) for mask in holes_of(out)}
    assert len(positions) > 50  # each image draws its own hole


def test_holes_are_centred_uniformly_so_every_pixel_can_be_covered():
    x = positive_images(n=2000, size=8)
    coverage = holes_of(cutout_batch(x, 1, 2, generator=torch.Generator().manual_seed(0)))
    coverage = coverage.float().mean(0)
    assert coverage.min() > 0  # corners too (holes are clipped, not kept inside)
    # a 2-pixel hole covers an interior pixel from 4 centres: probability 4 / 64
    assert coverage[2:6, 2:6].mean().item() == pytest.approx(4 / 64, rel=0.15)


def test_several_holes_and_a_fill_value():
    x = positive_images(n=100)
    out = cutout_batch(
        x, num_holes=3, length=3, fill=-2.0, generator=torch.Generator().manual_seed(1)
    )
    filled = (out == -2.0)[:, 0]
    counts = filled.flatten(1).sum(1)
    assert counts.max() <= 3 * 9 and counts.min() > 0
    assert (counts > 9).float().mean() > 0.5  # usually more than one hole's worth


def test_length_is_a_fraction_of_the_shorter_side_or_whole_pixels():
    assert hole_side(0.5, 32, 32) == 16
    assert hole_side(0.5, 32, 20) == 10
    assert hole_side(1.0, 32, 32) == 32
    assert hole_side(8, 32, 32) == 8
    assert hole_side(0.01, 32, 32) == 1
    with pytest.raises(ValueError, match="whole number"):
        hole_side(2.5, 32, 32)


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    CutOut,
    [
        ({"num_holes": 0}, "cutout.num_holes must be an integer >= 1, got 0"),
        ({"num_holes": 1.5}, "cutout.num_holes"),
        ({"length": 0}, "cutout.length must be > 0"),
        ({"length": 2.5}, "cutout.length must be a fraction in"),
        ({"fill": math.nan}, "cutout.fill must be finite"),
    ],
)


def test_declaration_orders_it_between_the_policies_and_the_resizers():
    declared = CutOut().declare()
    assert declared.events[Event.AFTER_DATALOADER].writes == {"batch.inputs"}
    assert {"randaugment", "augmix", "selective_backprop"} <= declared.runs_after
    assert {"colout", "mixup", "cutmix", "progressive_resizing"} <= declared.runs_before
    plan = build_plan({"cutout": declared}, model_kind="gpt2", data_kind="text")
    assert [c.kind for c in plan.conflicts] == ["not-applicable"]


# -- in a run ---------------------------------------------------------------------------------


def test_twenty_steps_see_holes_and_eval_does_not():
    g = torch.Generator().manual_seed(0)
    data = {"inputs": positive_images(32, 12), "targets": torch.randint(0, 10, (32,), generator=g)}
    seen = SeenInputs()
    fit_small_cnn(data, CutOut(num_holes=1, length=0.5), 20, [seen], eval_data=data)
    assert len(seen.losses) == 20 and all(torch.isfinite(loss) for loss in seen.losses)
    for inputs in seen.train:
        counts = holes_of(inputs).flatten(1).sum(1)
        assert counts.min() > 0 and counts.max() <= 36  # one hole of side 6 per image
    assert all(not (inputs == 0).any() for inputs in seen.eval)
