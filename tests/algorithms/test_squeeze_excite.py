import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    bad_arguments_test,
    image_loader,
    optimizer_parameter_ids,
    sgd_image_trainer,
    tiny_resnet,
)
from speedup.algorithms.squeeze_excite import (
    SqueezeExcite,
    SqueezeExcite2d,
    SqueezeExciteConv2d,
    apply_squeeze_excite,
    latent_width,
)
from torch import nn

from speedup.event import Event
from speedup.models import Classifier
from speedup.models.vision import CifarResNet
from speedup.trainer import Trainer


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_the_gate_is_a_sigmoid_of_an_mlp_on_the_pooled_channels():
    torch.manual_seed(0)
    se = SqueezeExcite2d(6, 3)
    x = torch.randn(2, 6, 5, 5)
    # Hu et al. Eq. 3: s = sigmoid(W_2 relu(W_1 z)), z the channel means; no biases
    assert se.reduce.bias is None and se.expand.bias is None
    pooled = x.mean((2, 3))
    hidden = F.relu(pooled @ se.reduce.weight.T)
    gate = torch.sigmoid(hidden @ se.expand.weight.T)
    out = se(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x * gate[:, :, None, None])
    assert torch.all((gate > 0) & (gate < 1))


@pytest.mark.parametrize(("latent", "min_channels"), [(4, 16), (0.25, 32)])
def test_parameters_added_match_the_formula(latent, min_channels):
    torch.manual_seed(0)
    net = CifarResNet(1, num_classes=4, width=8)  # convs with 8, 16 and 32 output channels
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    gated = [m.out_channels for m in convs if min(m.in_channels, m.out_channels) >= min_channels]
    hidden = [int(latent) if latent >= 1 else int(c * latent) for c in gated]
    # per gate: W_1 [L, C] + W_2 [C, L], no biases
    expected = sum(2 * c * h for c, h in zip(gated, hidden))
    before = count(net)
    x = torch.randn(2, 3, 16, 16)
    assert apply_squeeze_excite(net, latent, min_channels) == len(gated) > 0
    assert count(net) - before == expected
    assert net(x).shape == (2, 4)
    # idempotent: a gated convolution is not gated twice
    assert apply_squeeze_excite(net, latent, min_channels) == 0
    assert count(net) - before == expected


def test_on_resnet50_the_gated_convolutions_are_those_with_min_in_out_at_least_128():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):  # shapes only: no 25M-parameter initialisation
        net = torchvision.models.resnet50()
    convs = {name: m for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    by_rule = {n for n, m in convs.items() if min(m.in_channels, m.out_channels) >= 128}
    by_output = {n for n, m in convs.items() if m.out_channels >= 128}
    assert (len(convs), len(by_rule), len(by_output)) == (53, 42, 46)
    assert apply_squeeze_excite(net, latent_channels=64, min_channels=128) == len(by_rule)
    gated = {n for n, m in net.named_modules() if isinstance(m, SqueezeExciteConv2d)}
    assert gated == by_rule


def test_latent_width():
    assert latent_width(256, 64) == 64
    assert latent_width(256, 1 / 16) == 16  # Hu et al.'s reduction ratio r = 16
    assert latent_width(8, 0.01) == 1


def test_the_gated_conv_keeps_the_original_convolution():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    wrapped = SqueezeExciteConv2d(conv, 2)
    assert wrapped.conv is conv
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(wrapped(x), wrapped.se(conv(x)))


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    SqueezeExcite,
    [
        ({"latent_channels": 0}, "squeeze_excite.latent_channels must be"),
        ({"latent_channels": -1}, "squeeze_excite.latent_channels"),
        ({"latent_channels": 1.5}, "whole number of channels >= 1 or a fraction"),
        ({"min_channels": 0}, "squeeze_excite.min_channels must be an integer >= 1, got 0"),
    ],
)


def test_declaration_orders_it_after_blurpool():
    decl = SqueezeExcite().declare()
    assert decl.events[Event.INIT].writes == {"model.modules"}
    assert "blurpool" in decl.runs_after
    assert decl.model_kinds == {"cnn"} and decl.data_kinds == {"image"}


def test_narrow_network_warns_that_nothing_was_added():
    model = Classifier(CifarResNet(1, num_classes=4, width=4), 4, kind="cnn")
    with pytest.warns(UserWarning, match="no effect"):
        Trainer(model, image_loader(), "1ba", algorithms=[SqueezeExcite()], device="cpu")


def test_twenty_steps_train_the_new_gates():
    model = tiny_resnet()
    plain = copy.deepcopy(model)
    se = SqueezeExcite(latent_channels=4, min_channels=16)
    trainer = sgd_image_trainer(model, se)
    model = trainer.state.model
    gates = [m for m in model.modules() if isinstance(m, SqueezeExcite2d)]
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    wide = [m for m in convs if min(m.in_channels, m.out_channels) >= 16]
    assert se.added == len(gates) == len(wide) == 3  # not the 8->16 one: its input is 8 wide
    assert count(model) > count(plain)
    held = optimizer_parameter_ids(trainer)
    assert held == [id(p) for p in model.parameters() if p.requires_grad]
    start = {n: p.detach().clone() for n, p in model.named_parameters() if ".se." in n}
    assert len(start) == 2 * len(gates)  # W_1 and W_2 of each gate
    trainer.fit()
    assert torch.isfinite(trainer.state.train_metrics["loss"])
    for name, param in model.named_parameters():
        if name in start:
            assert not torch.equal(param, start[name]), name  # the gates learned
