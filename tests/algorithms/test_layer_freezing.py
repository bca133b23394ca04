import copy
import math

import pytest
import torch
from conftest import (
    SaveAt,
    bad_arguments_test,
    load_optimizer_and_time,
    snapshot,
    through_torch_save,
)
from speedup.algorithms.layer_freezing import (
    LayerFreezing,
    freezable_layers,
    freeze_fraction,
    freeze_layers,
)
from torch import nn

from speedup.callback import Callback
from speedup.data import TensorBatchLoader
from speedup.event import Event
from speedup.models import Classifier
from speedup.models.vision import CifarResNet
from speedup.trainer import Trainer

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}


def four_layer_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()
    )
    net.append(nn.Linear(16, 4))
    return Classifier(net, 4)


def data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randn(n, 8, generator=g), "targets": torch.arange(n) % 4}


class Record(Callback):
    """Frozen layer count at each epoch end (callbacks run after algorithms) and the weights
    after every batch."""

    def __init__(self, algorithm):
        self.algorithm, self.frozen, self.weights = algorithm, {}, {}

    def epoch_end(self, state, logger):
        self.frozen[state.timestamp.epoch] = self.algorithm.frozen_layers

    def batch_end(self, state, logger):
        self.weights[state.timestamp.batch] = copy.deepcopy(state.model.state_dict())


def train(algorithm, epochs=8, callbacks=(), model=None):
    loader = TensorBatchLoader(data(), 8, shuffle=True, drop_last=True, seed=0)  # 2 batches/ep
    trainer = Trainer(
        model or four_layer_model(),
        loader,
        f"{epochs}ep",
        algorithms=[algorithm],
        callbacks=list(callbacks),
        optimizer=SGD,
    )
    trainer.fit()
    return trainer


# -- the schedule and the layers ---------------------------------------------------------------


def test_freeze_fraction_schedule():
    assert freeze_fraction(0.5, 0.5, 1.0) == 0.0
    assert freeze_fraction(0.75, 0.5, 1.0) == pytest.approx(0.5)
    assert freeze_fraction(1.0, 0.5, 0.8) == pytest.approx(0.8)
    assert freeze_fraction(0.1, 0.0, 1.0) == pytest.approx(0.1)
    assert freeze_fraction(0.3, 0.5, 1.0) == 0.0


def test_layers_are_the_modules_owning_parameters_in_registration_order():
    names = [name for name, _ in freezable_layers(four_layer_model())]
    assert names == ["net.0", "net.2", "net.4", "net.6"]
    resnet = CifarResNet(3, num_classes=10, width=4)
    layers = freezable_layers(resnet)
    # every parameter belongs to exactly one layer, and the stem comes first, the head last
    owned = sum(len(list(m.parameters(recurse=False))) for _, m in layers)
    assert owned == len(list(resnet.parameters()))
    assert isinstance(layers[0][1], nn.Conv2d) and isinstance(layers[-1][1], nn.Linear)


def test_a_parameter_owned_by_a_module_with_children_is_a_layer():
    class WithToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.zeros(4))
            self.body = nn.Linear(4, 4)

    outer = nn.Sequential(nn.Linear(4, 4), WithToken())
    assert [n for n, _ in freezable_layers(outer)] == ["0", "1", "1.body"]


def test_freeze_layers_freezes_a_prefix_and_tied_weights_wait_for_their_last_owner():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight  # tied: embed and head share one tensor

    model = Tied()
    # 3 layers, the last (head) never frozen: floor(fraction * 2) of embed, mid
    assert freeze_layers(model, 0.5) == 1  # embed only
    assert model.embed.weight.requires_grad  # but its weight is the head's too
    assert freeze_layers(model, 1.0) == 2
    assert not model.mid.weight.requires_grad
    assert model.embed.weight.requires_grad  # tied to the output layer: never frozen
    with pytest.raises(ValueError, match="fraction must be in"):
        freeze_layers(model, 1.5)


# -- in a run ---------------------------------------------------------------------------------


def test_frozen_count_follows_the_schedule_and_frozen_weights_stay_exactly_constant():
    freezing = LayerFreezing(freeze_start="0.5dur", freeze_level=1.0)
    record = Record(freezing)
    trainer = train(freezing, 8, [record])
    # 8 epochs, 4 layers of which the first 3 may freeze: fraction (e/8 - 0.5) / 0.5 after
    # epoch e -> floor(3 * fraction)
    assert record.frozen == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 1, 7: 2, 8: 3}
    w = record.weights  # 2 batches per epoch: epoch e ends at batch 2e
    for layer, epoch in (("net.0", 6), ("net.2", 7)):
        for later in range(2 * epoch + 1, 17):
            for kind in ("weight", "bias"):
                key = f"{layer}.{kind}"
                assert torch.equal(w[later][key], w[2 * epoch][key]), (key, later)
        # and it was training until then
        assert not torch.equal(w[2 * epoch][f"{layer}.weight"], w[2 * epoch - 1][f"{layer}.weight"])
    assert not torch.equal(w[16]["net.6.weight"], w[15]["net.6.weight"])
    model = trainer.state.model
    assert [p.requires_grad for p in model.parameters()] == [False] * 6 + [True] * 2
    assert math.isfinite(float(trainer.state.train_metrics["loss"]))


def test_at_freeze_level_one_the_output_layer_keeps_training():
    freezing = LayerFreezing(freeze_start="0.5dur", freeze_level=1.0)
    trainer = train(freezing, 4)
    model = trainer.state.model
    assert freezing.frozen_layers == 3  # every layer but the output layer
    head = model.net[6]
    assert head.weight.requires_grad and head.bias.requires_grad
    # one more step after the schedule reached freeze_level 1.0: the head gets a gradient
    # and moves, everything below it stays put
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = trainer.state.optimizer
    optimizer.zero_grad()
    model.loss(model(data()), data()).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name.startswith("net.6."):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            assert not torch.equal(param, before[name]), name
        else:
            assert param.grad is None and torch.equal(param, before[name]), name


def test_freeze_level_caps_the_frozen_fraction():
    freezing = LayerFreezing(freeze_start="0.25dur", freeze_level=0.5)
    record = Record(freezing)
    train(freezing, 8, [record])
    assert max(record.frozen.values()) == 1  # floor(0.5 * 3)
    assert record.frozen[8] == 1 and record.frozen[2] == 0


def test_smoke_20_steps_on_a_resnet_freezes_the_stem_first():
    g = torch.Generator().manual_seed(0)
    images = {"inputs": torch.randn(16, 3, 8, 8, generator=g), "targets": torch.arange(16) % 10}
    loader = TensorBatchLoader(images, 4, shuffle=True, drop_last=True, seed=0)  # 4 ba/ep
    torch.manual_seed(0)
    model = Classifier(CifarResNet(1, num_classes=10, width=4), 10)
    layers = freezable_layers(model)
    assert len(layers) == 15  # stem conv+bn, 3 blocks x (conv, bn, conv, bn), fc
    freezing = LayerFreezing()
    record = Record(freezing)
    trainer = Trainer(
        model, loader, "20ba", algorithms=[freezing], callbacks=[record], optimizer=SGD
    )
    trainer.fit()
    # epoch ends at 0.2 .. 1.0 of the run: fractions 0, 0, 0.2, 0.6, 1.0 of the 14 layers
    # below the head
    assert record.frozen == {1: 0, 2: 0, 3: 2, 4: 8, 5: 14}
    assert model.net.fc.weight.requires_grad
    stem = "net.stem.0.weight"
    assert torch.equal(record.weights[12][stem], record.weights[20][stem])
    assert not torch.equal(record.weights[11][stem], record.weights[12][stem])
    assert not model.net.stem[0].weight.requires_grad
    assert math.isfinite(float(trainer.state.train_metrics["loss"]))


# -- resume -----------------------------------------------------------------------------------


def test_resume_restores_the_frozen_set_and_the_run_exactly():
    freezing = LayerFreezing()
    checkpoint = SaveAt(6, lambda state: snapshot(state, algorithm=freezing), unit="epoch")
    full = train(freezing, 8, [checkpoint])
    saved = checkpoint.saved
    assert saved["algorithm"] == {"frozen_layers": 1}

    resumed_alg = LayerFreezing()
    resumed_alg.load_state_dict(through_torch_save(saved["algorithm"]))
    model = four_layer_model(seed=3)
    model.load_state_dict(saved["model"])
    loader = TensorBatchLoader(data(), 8, shuffle=True, drop_last=True, seed=0)
    seen = {}

    class Peek(Callback):
        def fit_start(self, state, logger):  # callbacks run after algorithms
            seen["requires_grad"] = [p.requires_grad for p in state.model.parameters()]

    trainer = Trainer(
        model, loader, "8ep", algorithms=[resumed_alg], callbacks=[Peek()], optimizer=SGD
    )
    # frozen params are still in the optimizer, so the saved optimizer state fits as it is
    load_optimizer_and_time(trainer, saved)
    trainer.fit()
    assert seen["requires_grad"] == [False] * 2 + [True] * 6
    for name, value in full.state.model.state_dict().items():
        assert torch.equal(value, trainer.state.model.state_dict()[name]), name
    assert resumed_alg.frozen_layers == 3


# -- arguments and declaration -----------------------------------------------------------------


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    LayerFreezing,
    [
        ({"freeze_level": 0.0}, r"layer_freezing.freeze_level must be in \(0, 1\], got 0"),
        ({"freeze_level": 1.5}, r"layer_freezing.freeze_level must be in \(0, 1\]"),
        ({"freeze_start": "1dur"}, r"layer_freezing.freeze_start must be in \[0dur, 1dur\)"),
        ({"freeze_start": "soon"}, "layer_freezing.freeze_start"),
        ({"freeze_start": "10sec"}, "layer_freezing.freeze_start.*wall-clock"),
    ],
)


def test_a_start_after_the_end_fails_at_fit_start():
    from speedup.config import ConfigError

    with pytest.raises(ConfigError, match="algorithms.layer_freezing.freeze_start: 10ep"):
        train(LayerFreezing(freeze_start="10ep"), 8)


def test_declaration():
    decl = LayerFreezing().declare()
    assert set(decl.events) == {Event.FIT_START, Event.EPOCH_END}
    assert decl.events[Event.EPOCH_END].writes == {"model.mode"}
    assert decl.model_kinds is None and decl.data_kinds is None


def test_the_optimizer_holds_every_parameter_and_skips_frozen_ones():
    freezing = LayerFreezing()
    trainer = train(freezing, 8)
    model, optimizer = trainer.state.model, trainer.state.optimizer
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == len(list(model.parameters()))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize(("seek_to", "frozen"), [(3, 0), (12, 1), (13, 1), (15, 2)])
def test_a_run_started_part_way_freezes_what_the_schedule_had_frozen(seek_to, frozen):
    # 8 epochs of 2 batches: after epoch e the schedule has floor(3 * (e/8 - 0.5) / 0.5) frozen
    freezing = LayerFreezing(freeze_start="0.5dur", freeze_level=1.0)
    loader = TensorBatchLoader(data(), 8, shuffle=True, drop_last=True, seed=0)
    trainer = Trainer(four_layer_model(), loader, "8ep", algorithms=[freezing], optimizer=SGD)
    trainer.seek(seek_to)
    trainer.engine.run(Event.FIT_START)
    assert freezing.frozen_layers == frozen
    grads = [p.requires_grad for p in trainer.state.model.parameters()]
    assert grads == [False] * (2 * frozen) + [True] * (8 - 2 * frozen)
