from types import SimpleNamespace

import pytest
import torch
from conftest import SeenInputs, bad_arguments_test, fit_small_cnn, random_images
from speedup.algorithms.colout import ColOut, colout_batch, colout_indices

from speedup.engine import build_plan
from speedup.event import Event


def coordinates(n=4, height=20, width=30):
    """Images whose every pixel holds ``row * 1000 + column`` (all channels alike)."""
    grid = torch.arange(height)[:, None] * 1000 + torch.arange(width)[None, :]
    return grid.float().expand(n, 3, height, width).clone()


# -- the math ---------------------------------------------------------------------------------


def test_drops_the_same_rows_and_columns_from_every_image_keeping_order():
    x = coordinates()
    out = colout_batch(x, p_row=0.15, p_col=0.2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 17, 24)  # 20 - round(3.0) rows, 30 - round(6.0) columns
    rows = (out[0, 0, :, 0] // 1000).long()
    cols = (out[0, 0, 0, :] % 1000).long()
    assert torch.all(rows[1:] > rows[:-1]) and torch.all(cols[1:] > cols[:-1])  # order kept
    expected = x[:, :, rows][:, :, :, cols]
    assert torch.equal(out, expected)  # the kept pixels are exactly the input's
    assert torch.equal(out, out[:1].expand_as(out))  # batch-wise: one choice for all images


def test_each_call_drops_different_rows_and_p_zero_keeps_all():
    g = torch.Generator().manual_seed(0)
    draws = {tuple(colout_indices(40, 40, 0.25, 0.25, g)[0].tolist()) for _ in range(20)}
    assert len(draws) == 20
    rows, cols = colout_indices(10, 12, 0.0, 0.0, g)
    assert torch.equal(rows, torch.arange(10)) and torch.equal(cols, torch.arange(12))
    rows, _ = colout_indices(3, 3, 0.9, 0.0, g)
    assert rows.numel() == 1  # at least one row survives


def colout_on(colout, inputs, targets):
    state = SimpleNamespace(batch={"inputs": inputs, "targets": targets})
    colout.apply(Event.AFTER_DATALOADER, state, None)
    return state.batch["inputs"], state.batch["targets"]


def test_segmentation_targets_lose_the_same_rows_and_columns():
    colout = ColOut(p_row=0.2, p_col=0.2)
    masks = coordinates(2, 10, 10)[:, 0].long()  # [N, H, W]
    inputs, targets = colout_on(colout, coordinates(2, 10, 10), masks)
    assert inputs.shape == (2, 3, 8, 8) and targets.shape == (2, 8, 8)
    assert torch.equal(targets, inputs[:, 0].long())
    # class-index targets are left alone under "auto" and refused when forced
    labels = torch.tensor([1, 2])
    inputs, targets = colout_on(colout, coordinates(2, 10, 10), labels)
    assert inputs.shape[-2:] == (8, 8) and targets is labels
    with pytest.raises(ValueError, match="resize_target is true"):
        colout_on(ColOut(resize_target=True), coordinates(2, 10, 10), labels)
    inputs, targets = colout_on(ColOut(resize_target=False), coordinates(2, 10, 10), masks)
    assert targets is masks


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    ColOut,
    [
        ({"p_row": 1.0}, r"colout.p_row must be in \[0, 1\), got 1.0"),
        ({"p_col": -0.1}, r"colout.p_col must be in \[0, 1\)"),
        ({"resize_target": "yes"}, "colout.resize_target must be 'auto', true or false"),
    ],
)


def test_declared_for_conv_nets_on_images_only():
    declared = ColOut().declare()
    assert declared.model_kinds == {"cnn"} and declared.data_kinds == {"image"}
    assert declared.events[Event.AFTER_DATALOADER].writes == {"batch.inputs", "batch.targets"}
    assert ColOut(resize_target=False).declare().events[Event.AFTER_DATALOADER].writes == {
        "batch.inputs"
    }
    assert "progressive_resizing" in declared.runs_before and "cutout" in declared.runs_after
    plan = build_plan({"colout": declared}, model_kind="mlp", data_kind="image")
    assert "does not apply to model kind 'mlp'" in str(plan.conflicts[0])


# -- in a run ---------------------------------------------------------------------------------


def test_twenty_steps_train_on_smaller_images_and_evaluate_at_full_size():
    data = random_images(32, 16, 10)
    sizes = SeenInputs(record=lambda inputs: tuple(inputs.shape[-2:]))
    fit_small_cnn(data, ColOut(p_row=0.15, p_col=0.3), 20, [sizes], eval_data=data)
    assert len(sizes.losses) == 20 and all(torch.isfinite(loss) for loss in sizes.losses)
    assert set(sizes.train) == {(14, 11)}  # 16 - round(2.4), 16 - round(4.8)
    assert set(sizes.eval) == {(16, 16)}
