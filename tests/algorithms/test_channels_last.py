import copy

import pytest
import torch
from conftest import image_loader, optimizer_parameter_ids, plan_of, tiny_resnet
from speedup.algorithms.blurpool import BlurConv2d, BlurPool
from speedup.algorithms.channels_last import ChannelsLast, apply_channels_last, to_channels_last
from speedup.algorithms.ghost_batchnorm import GhostBatchNorm, GhostBatchNorm2d
from speedup.algorithms.low_precision_groupnorm import LowPrecisionGroupNorm
from speedup.algorithms.progressive_resizing import ProgressiveResizing
from speedup.algorithms.squeeze_excite import SqueezeExcite, SqueezeExciteConv2d
from speedup.algorithms.stochastic_depth import StochasticBlock, StochasticDepth
from speedup.algorithms.weight_standardization import WeightStandardization
from torch import nn

from speedup.callback import Callback
from speedup.event import Event
from speedup.models import Classifier
from speedup.models.nets import SmallCNN2d
from speedup.trainer import Trainer

CL = torch.channels_last


def is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def test_to_channels_last_converts_4d_only_and_never_copies_twice():
    x = torch.randn(2, 3, 5, 5)
    y = to_channels_last(x)
    assert is_channels_last(y) and torch.equal(x, y)
    assert to_channels_last(y) is y
    flat = torch.randn(2, 7)
    assert to_channels_last(flat) is flat


def test_outputs_are_unchanged_and_weights_really_are_channels_last():
    torch.manual_seed(0)
    net = SmallCNN2d(3, 4, channels=8).eval()
    reference = copy.deepcopy(net)
    params = [id(p) for p in net.parameters()]
    assert apply_channels_last(net) is net
    assert [id(p) for p in net.parameters()] == params  # same objects: optimizers stay valid
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(is_channels_last(m.weight) for m in convs)
    x = torch.randn(4, 3, 16, 16)
    seen = []
    convs[1].register_forward_hook(lambda m, i, o: seen.append(o))
    for inputs in (x, to_channels_last(x)):
        torch.testing.assert_close(net(inputs), reference(inputs), rtol=1e-5, atol=1e-5)
    assert all(is_channels_last(o) for o in seen)  # activations propagate the layout


def test_declaration_and_order_after_input_writers_and_every_surgery():
    decl = ChannelsLast().declare()
    assert decl.events[Event.INIT].writes == {"model.weights"}
    assert decl.events[Event.AFTER_DATALOADER].writes == {"batch.inputs"}
    assert decl.model_kinds == {"cnn"} and decl.data_kinds == {"image"}
    # listed first, it still runs after progressive resizing, with no conflict
    algorithms = [ChannelsLast(), ProgressiveResizing()]
    plan = plan_of(algorithms, "cnn", "image")
    assert plan.conflicts == []
    assert plan.order[Event.AFTER_DATALOADER] == ["progressive_resizing", "channels_last"]


def surgery():
    """The seven surgery algorithms by name, in the order they must plan in: channels-last
    converts the finished model, last."""
    return {
        "stochastic_depth": StochasticDepth(drop_rate=0.3),
        "blurpool": BlurPool(min_channels=8),
        "squeeze_excite": SqueezeExcite(latent_channels=4, min_channels=16),
        "weight_standardization": WeightStandardization(),
        "ghost_batchnorm": GhostBatchNorm(ghost_batch_size=4),
        "low_precision_groupnorm": LowPrecisionGroupNorm(),
        "channels_last": ChannelsLast(),
    }


@pytest.mark.parametrize("reverse", [True, False])
def test_the_seven_surgery_algorithms_plan_in_one_order_whatever_the_recipe_order(reverse):
    algorithms = list(surgery().values())
    if reverse:
        algorithms.reverse()
    plan = plan_of(algorithms, "cnn", "image")
    assert plan.conflicts == []
    assert plan.order[Event.INIT] == list(surgery())
    # and every pair alone is ordered too (no write-write conflict without the others)
    for i, a in enumerate(algorithms):
        for b in algorithms[i + 1 :]:
            pair = plan_of([a, b], "cnn", "image")
            assert pair.conflicts == [], (a.name, b.name)


class Layouts(Callback):
    def __init__(self):
        self.inputs, self.losses = [], []

    def before_forward(self, state, logger):
        self.inputs.append(is_channels_last(state.batch["inputs"]))

    def after_loss(self, state, logger):
        self.losses.append(state.loss.detach().item())


def test_twenty_steps_keep_weights_and_inputs_channels_last():
    torch.manual_seed(0)
    model = Classifier(SmallCNN2d(3, 4, channels=8), 4, kind="cnn")
    taps = Layouts()
    trainer = Trainer(
        model,
        image_loader(),
        "20ba",
        algorithms=[ChannelsLast()],
        callbacks=[taps],
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        device="cpu",
        data_kind="image",
    )
    held = optimizer_parameter_ids(trainer)
    assert held == [id(p) for p in model.parameters()]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    outputs = []
    convs[-1].register_forward_hook(lambda m, i, o: outputs.append(is_channels_last(o)))
    start = convs[0].weight.detach().clone()
    trainer.fit()
    assert taps.inputs == [True] * 20 and outputs == [True] * 20
    assert all(is_channels_last(m.weight) for m in convs)  # optimizer steps keep the layout
    assert not torch.equal(convs[0].weight, start)
    assert all(torch.isfinite(torch.tensor(taps.losses)))


class StopAt(Callback):
    def __init__(self, batch):
        self.batch = batch

    def batch_end(self, state, logger):
        if state.timestamp.batch == self.batch:
            state.stop_training("test")


def all_surgery_trainer(steps, callbacks=()):
    model = tiny_resnet()
    algorithms = [a for a in surgery().values() if a.name != "low_precision_groupnorm"]
    return Trainer(
        model,
        image_loader(batch_size=8),
        f"{steps}ba",
        algorithms=algorithms,
        callbacks=list(callbacks),
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        device="cpu",
        data_kind="image",
        seed=3,
    )


def test_all_surgery_composes_trains_and_resumes_exactly(tmp_path):
    straight = all_surgery_trainer(8)
    model = straight.state.model
    # the surgery composed: blurred, gated, stochastic, standardised, ghost-normalised, NHWC
    assert any(isinstance(m, StochasticBlock) for m in model.modules())
    gated = [m for m in model.modules() if isinstance(m, SqueezeExciteConv2d)]
    assert gated and any(isinstance(m.conv, BlurConv2d) for m in gated)
    assert any(isinstance(m, GhostBatchNorm2d) for m in model.modules())
    assert any(
        name.endswith("parametrizations.weight.original") for name, _ in model.named_parameters()
    )
    held = [p for group in straight.state.optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in held] == [id(p) for p in model.parameters()]
    straight.fit()
    assert torch.isfinite(straight.state.train_metrics["loss"])

    first = all_surgery_trainer(8, [StopAt(4)])
    first.fit()
    assert first.state.timestamp.batch == 4
    path = first.save_checkpoint(tmp_path / "ck")
    resumed = all_surgery_trainer(8)  # built fresh: the surgery runs again, then states load
    resumed.load_checkpoint(path)
    resumed.fit()
    a, b = straight.state.model.state_dict(), resumed.state.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
