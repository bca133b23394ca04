import math

import pytest
import torch
from conftest import SaveAt, algorithm_trainer, bad_arguments_test
from speedup.algorithms.gyro_dropout import (
    GyroDropout,
    GyroDropoutLayer,
    apply_gyro_dropout,
    gyro_dropout,
    scheduled_subnetworks,
)
from torch import nn

from speedup.callback import Callback
from speedup.checkpoint import save_checkpoint
from speedup.data import TensorBatchLoader
from speedup.event import Event
from speedup.models import Classifier
from speedup.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the math ---------------------------------------------------------------------------------


def test_each_contiguous_group_of_rows_gets_its_own_mask_scaled_by_one_over_keep():
    masks = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    x = torch.arange(1.0, 25.0).view(6, 4)
    out = gyro_dropout(x, masks, p=0.5)
    expected = x * masks.float().repeat_interleave(2, dim=0) * 2.0
    torch.testing.assert_close(out, expected)
    # rows that do not divide evenly: row i goes to group i * tau // N
    out = gyro_dropout(torch.ones(4, 4), masks, p=0.0)
    torch.testing.assert_close(out, masks.float()[[0, 0, 1, 2]])


def test_masks_cover_the_last_dimension_and_broadcast_over_the_middle_ones():
    masks = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    x = torch.ones(2, 5, 3)  # [batch, positions, features]
    out = gyro_dropout(x, masks, p=0.25)
    for row in range(2):
        torch.testing.assert_close(out[row], masks[row].float().expand(5, 3) / 0.75)


def test_gyro_dropout_rejects_mismatched_masks():
    with pytest.raises(ValueError, match="masks"):
        gyro_dropout(torch.ones(4, 5), torch.ones(2, 3, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        gyro_dropout(torch.ones(4, 3), torch.ones(2, 3, dtype=torch.bool), 1.0)


def test_schedule_visits_every_subnetwork_once_per_cycle_in_groups_of_tau():
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    period, tau = 3, 4
    seen = [tuple(scheduled_subnetworks(s, period, permutation, tau).tolist()) for s in range(9)]
    # the active group changes exactly every `period` steps
    assert [seen[s] != seen[s - 1] for s in range(1, 9)] == [False, False, True] * 2 + [
        False,
        False,
    ]
    groups = [seen[0], seen[3], seen[6]]
    assert sorted(i for g in groups for i in g) == list(range(12))  # one cycle: all 12, once
    assert scheduled_subnetworks(9, period, permutation, tau).tolist() == list(groups[0])


def test_layer_draws_sigma_masks_once_and_is_the_identity_in_eval():
    torch.manual_seed(0)
    layer = GyroDropoutLayer(p=0.5, sigma=64, tau=4)
    x = torch.randn(8, 256)
    layer(x)
    masks = layer.masks.clone()
    assert masks.shape == (64, 256) and masks.dtype == torch.bool
    assert abs(masks.float().mean().item() - 0.5) < 0.02  # keep probability 1 - p
    layer(x)
    assert torch.equal(layer.masks, masks)  # drawn once, not per step
    layer.select(torch.tensor([5, 6, 7, 8]))
    out = layer(x)
    torch.testing.assert_close(out, gyro_dropout(x, masks[[5, 6, 7, 8]], 0.5))
    layer.eval()
    assert torch.equal(layer(x), x) and torch.equal(layer(x), layer(x))
    assert "masks" not in layer.state_dict()  # saved by the algorithm, not the model


def test_layer_select_checks_indices():
    layer = GyroDropoutLayer(p=0.5, sigma=8, tau=2)
    with pytest.raises(ValueError, match=r"expected 2 indices in \[0, 8\)"):
        layer.select(torch.tensor([1, 8]))
    with pytest.raises(ValueError, match="expected 2 indices"):
        layer.select(torch.tensor([1, 2, 3]))


def test_apply_replaces_every_dropout_and_keeps_other_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.3)))
    model.add_module("channel", nn.Dropout2d(0.2))  # channel dropout is a different method
    layers = apply_gyro_dropout(model, p=None, sigma=8, tau=2)
    assert [type(m) for m in (model[1], model[2][0])] == [GyroDropoutLayer] * 2
    assert [layer.p for layer in layers] == [0.1, 0.3]  # p=None keeps each layer's rate
    assert type(model.channel) is nn.Dropout2d and type(model[0]) is nn.Linear


test_rejects_invalid_arguments = bad_arguments_test(
    GyroDropout,
    [
        ({"p": 1.0}, r"gyro_dropout.p must be in \[0, 1\)"),
        ({"sigma": 0}, "sigma must be an integer >= 1"),
        ({"tau": 0}, r"tau must be an integer in \[1, sigma=256\]"),
        ({"sigma": 8, "tau": 16}, "tau must be an integer"),
        ({"sigma": 10, "tau": 4}, "sigma must be a multiple of tau"),
        ({"period": "10sec"}, "period must be a positive Time"),
        ({"period": "soon"}, "gyro_dropout.period"),
    ],
)


def test_declaration():
    decl = GyroDropout().declare()
    assert set(decl.events) == {Event.INIT, Event.FIT_START, Event.BEFORE_TRAIN_BATCH}
    assert decl.events[Event.INIT].writes == {"model.modules"}
    assert "timestamp" in decl.events[Event.BEFORE_TRAIN_BATCH].reads
    assert "no_op_model" in decl.runs_before and "factorize" in decl.runs_after
    assert not decl.runs_before & decl.runs_after


# -- in a run ---------------------------------------------------------------------------------


def mlp(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Dropout(0.1), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4)
    )
    return Classifier(net, 4, kind="mlp")


def loader(n=64):
    g = torch.Generator().manual_seed(0)
    targets = torch.arange(n) % 4
    inputs = torch.randn(4, 16, generator=g)[targets] * 2 + torch.randn(n, 16, generator=g)
    return TensorBatchLoader(
        {"inputs": inputs, "targets": targets}, 16, shuffle=True, drop_last=True, seed=0
    )


class MaskSpy(Callback):
    """Records, per step, the keep-masks the first dropout applied to each row: its inputs
    are Gaussian (never exactly zero), so a zero output means a dropped feature."""

    def __init__(self):
        self.steps, self.losses, self._rows = [], [], None

    def fit_start(self, state, logger):
        layer = state.model.net[0]
        layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if module.training:
            x = inputs[0]
            assert torch.allclose(output[output != 0], x[output != 0] / (1 - module.p))
            self._rows = output != 0

    def batch_end(self, state, logger):
        self.steps.append(self._rows)
        self.losses.append(float(state.train_metrics["loss"]))


def distinct(rows):
    return {tuple(r.tolist()) for r in rows}


def run(algorithm, steps=20, callbacks=()):
    trainer = algorithm_trainer(mlp(), loader(), algorithm, steps, callbacks, lr=0.1)
    trainer.fit()
    return trainer


def test_twenty_steps_train_tau_masks_per_step_that_change_every_period():
    spy = MaskSpy()
    algorithm = GyroDropout(p=0.5, sigma=8, tau=2, period="2ba")
    trainer = run(algorithm, 20, [spy])
    assert len(algorithm.layers) == 2
    assert all(isinstance(trainer.state.model.net[i], GyroDropoutLayer) for i in (0, 3))
    assert all(math.isfinite(v) for v in spy.losses) and len(spy.losses) == 20
    per_step = [distinct(rows) for rows in spy.steps]
    assert all(len(masks) == 2 for masks in per_step)  # tau subnetworks at once
    for step in range(1, 20):  # a new group exactly at multiples of the period
        if step % 8:  # (a new cycle's first group may by chance equal the last one)
            assert (per_step[step] != per_step[step - 1]) == (step % 2 == 0), step
    for start in (0, 8):  # a cycle of sigma / tau = 4 periods trains all sigma = 8, once each
        window = set().union(*per_step[start : start + 8])
        assert len(window) == 8
    assert len(set().union(*per_step)) == 8  # never more than the pre-selected pool
    # batch 16 in two groups of 8 contiguous rows
    first = spy.steps[0]
    assert all(torch.equal(first[i], first[0]) for i in range(8))
    assert all(torch.equal(first[i], first[8]) for i in range(8, 16))


def test_default_period_gives_every_subnetwork_an_equal_share_of_the_run():
    spy = MaskSpy()
    algorithm = GyroDropout(p=0.5, sigma=8, tau=2)
    run(algorithm, 20, [spy])
    assert algorithm.period_batches == 5  # 20 steps / (sigma / tau = 4 groups)
    per_step = [frozenset(distinct(rows)) for rows in spy.steps]
    assert len(set(per_step)) == 4 and len(set().union(*per_step)) == 8
    assert all(per_step[s] == per_step[s - s % 5] for s in range(20))


def test_eval_is_deterministic_and_uses_the_whole_network():
    algorithm = GyroDropout(p=0.5, sigma=8, tau=2, period="2ba")
    trainer = run(algorithm, 3)
    model = trainer.state.model.eval()
    batch = {"inputs": torch.randn(5, 16), "targets": torch.zeros(5, dtype=torch.long)}
    net = model.net
    plain = net[4](torch.relu(net[1](batch["inputs"])))
    torch.testing.assert_close(model(batch), plain)
    torch.testing.assert_close(model.eval_forward(batch), model.eval_forward(batch))


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    saver = SaveAt(7, lambda state: save_checkpoint(state, tmp_path))
    full = run(GyroDropout(p=0.5, sigma=8, tau=2, period="3ba"), 20, [saver])
    resumed_algorithm = GyroDropout(p=0.5, sigma=8, tau=2, period="3ba")
    # other initial weights: the checkpoint must restore everything
    trainer = algorithm_trainer(mlp(seed=5), loader(), resumed_algorithm, lr=0.1)
    trainer.load_checkpoint(saver.saved)
    trainer.fit()
    for name, value in full.state.model.state_dict().items():
        assert torch.equal(trainer.state.model.state_dict()[name], value), name
    for a, b in zip(full.state.algorithms[0].layers, resumed_algorithm.layers):
        assert torch.equal(a.masks, b.masks) and torch.equal(a.active, b.active)


def test_a_model_without_dropout_warns():
    model = Classifier(nn.Sequential(nn.Linear(16, 4)), 4)
    with pytest.warns(UserWarning, match="no nn.Dropout"):
        Trainer(model, loader(), "1ba", algorithms=[GyroDropout()], device="cpu")
