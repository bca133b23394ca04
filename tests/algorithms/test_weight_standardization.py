import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import optimizer_parameter_ids, sgd_image_trainer, tiny_resnet
from speedup.algorithms.magnitude_pruning import MagnitudePruning
from speedup.algorithms.weight_standardization import (
    WeightStandardization,
    WeightStandardizer,
    apply_weight_standardization,
    standardize_weight,
    standardized_state_dict,
)
from torch import nn
from torch.nn.utils import parametrize

from speedup.engine import build_plan
from speedup.event import Event
from speedup.models.vision import CifarResNet


def assert_standardized(weight, raw, eps=1e-5):
    """Zero mean and unit variance per output channel; exactly, the variance is
    var_raw / (var_raw + eps), which is 1 up to eps."""
    flat, raw = weight.detach().flatten(1), raw.detach().flatten(1)
    assert flat.mean(1).abs().max() < 1e-6
    var, raw_var = flat.var(1, unbiased=False), raw.var(1, unbiased=False)
    torch.testing.assert_close(var, raw_var / (raw_var + eps), rtol=1e-4, atol=0)
    assert (var - 1).abs().max() < 0.01


def test_standardize_weight_is_zero_mean_unit_variance_per_output_channel():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3) * torch.rand(8, 1, 1, 1) * 5 + torch.randn(8, 1, 1, 1)
    out = standardize_weight(w)
    assert_standardized(out, w)
    flat = w.flatten(1)
    expected = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(
        flat.var(1, unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(out.flatten(1), expected)


def test_every_conv_computes_with_standardized_weights():
    torch.manual_seed(0)
    net = CifarResNet(1, num_classes=4, width=4)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    raw = [c.weight.detach().clone() for c in convs]
    assert apply_weight_standardization(net) == len(convs) == 7
    for conv, before in zip(convs, raw):
        assert parametrize.is_parametrized(conv, "weight")
        assert torch.equal(conv.parametrizations.weight.original, before)  # raw kept
        assert_standardized(conv.weight, before)
    x = torch.randn(2, 4, 6, 6)
    conv = convs[1]
    torch.testing.assert_close(conv(x), F.conv2d(x, standardize_weight(raw[1]), padding=1))
    assert apply_weight_standardization(net) == 0  # idempotent


def test_a_standardized_state_dict_loads_into_the_plain_network():
    torch.manual_seed(0)
    net = CifarResNet(1, num_classes=4, width=4).eval()
    plain = copy.deepcopy(net)
    apply_weight_standardization(net)
    with torch.no_grad():  # raw weights that are far from standardized
        for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
            conv.parametrizations.weight.original.mul_(3.0).add_(0.5)
    baked = standardized_state_dict(net.state_dict())
    assert set(baked) == set(plain.state_dict())
    plain.load_state_dict(baked)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain(x), net(x))


def test_the_last_convolutions_can_be_left_alone():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 1))
    assert apply_weight_standardization(net, n_last_layers_ignore=1) == 2
    assert [parametrize.is_parametrized(m, "weight") for m in net] == [True, True, False]


def test_gradients_flow_through_the_standardization_to_the_raw_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    raw = conv.weight.detach().clone().requires_grad_(True)
    parametrize.register_parametrization(conv, "weight", WeightStandardizer())
    x = torch.randn(2, 3, 5, 5)
    conv(x).square().sum().backward()
    F.conv2d(x, standardize_weight(raw), conv.bias).square().sum().backward()
    torch.testing.assert_close(conv.parametrizations.weight.original.grad, raw.grad)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n_last_layers_ignore": -1}, "n_last_layers_ignore must be an integer >= 0, got -1"),
        ({"n_last_layers_ignore": 1.5}, "weight_standardization.n_last_layers_ignore"),
        ({"eps": 0.0}, "weight_standardization.eps must be > 0"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        WeightStandardization(**kwargs)


def test_declared_incompatible_with_magnitude_pruning():
    algorithms = [WeightStandardization(), MagnitudePruning(sparsity=0.5)]
    decl = algorithms[0].declare()
    assert decl.events[Event.INIT].writes == {"model.modules"}
    assert decl.model_kinds == {"cnn"} and decl.data_kinds == {"image"}
    plan = build_plan({a.name: a.declare() for a in algorithms}, "cnn", "image")
    assert [c.kind for c in plan.conflicts] == ["incompatible"]


def test_twenty_steps_train_the_raw_weights_and_stay_standardized():
    ws = WeightStandardization()
    trainer = sgd_image_trainer(tiny_resnet(), ws)
    assert ws.standardized == 7
    model = trainer.state.model
    held = optimizer_parameter_ids(trainer)
    assert held == [id(p) for p in model.parameters() if p.requires_grad]
    raw = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.endswith("parametrizations.weight.original")
    }
    assert len(raw) == 7
    trainer.fit()
    assert torch.isfinite(trainer.state.train_metrics["loss"])
    params = dict(model.named_parameters())
    for name, before in raw.items():
        assert not torch.equal(params[name], before), name  # the raw weights trained
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        # the effective weights are still standardized
        assert_standardized(conv.weight, conv.parametrizations.weight.original)
