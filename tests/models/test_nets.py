"""Plain nn.Module networks: shapes, parameter counts, deterministic init."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from speedup.models.nets import MLP, Conv1dNet, SmallCNN2d

if TYPE_CHECKING:
    from collections.abc import Callable


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("length", [40, 37, 72])
@pytest.mark.parametrize("padding_mode", ["circular", "zeros"])
def test_conv1dnet_output_shape(length: int, padding_mode: str) -> None:
    net = Conv1dNet(length=length, padding_mode=padding_mode)
    assert net(torch.randn(8, 1, length)).shape == (8, 10)
    assert net(torch.randn(3, length)).shape == (3, 10)  # channel dim added for 1-channel input


def test_conv1dnet_options() -> None:
    net = Conv1dNet(in_channels=3, num_classes=5, channels=16, length=40)
    assert net(torch.randn(2, 3, 40)).shape == (2, 5)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv1d)]
    assert len(convs) == 3
    assert all(c.stride == (2,) and c.out_channels == 16 for c in convs)
    # 40 -> 20 -> 10 -> 5 positions, 16 channels each, into a linear head
    assert net.head.in_features == 16 * 5


def test_conv1dnet_circular_padding_is_shift_equivariant() -> None:
    # With circular padding, shifting the input by 8 (= 2^3 strides) shifts the features.
    torch.manual_seed(0)
    net = Conv1dNet()
    x = torch.randn(4, 1, 40)
    a = net.features(x)
    b = net.features(torch.roll(x, 8, dims=-1))
    assert torch.allclose(torch.roll(a, 1, dims=-1), b, atol=1e-5)


def test_lenet_300_100_parameter_count() -> None:
    net = MLP(784, 10, widths=(300, 100))
    # (784*300 + 300) + (300*100 + 100) + (100*10 + 10)
    assert _num_params(net) == 266_610
    assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_mlp_default_widths_and_logistic_regression() -> None:
    assert _num_params(MLP(784, 10)) == 266_610
    linear = MLP(40, 10, widths=())
    assert _num_params(linear) == 40 * 10 + 10
    assert linear(torch.randn(7, 1, 40)).shape == (7, 10)
    assert MLP(40, 3, widths=(64, 32, 16))(torch.randn(2, 40)).shape == (2, 3)


@pytest.mark.parametrize("channels", [16, 32])
def test_small_cnn2d_output_shape(channels: int) -> None:
    net = SmallCNN2d(in_channels=3, num_classes=10, channels=channels)
    assert net(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert SmallCNN2d(in_channels=1, num_classes=7)(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 4 and len(norms) == 4


def test_small_cnn2d_trains_a_step() -> None:
    torch.manual_seed(0)
    net = SmallCNN2d()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    opt.step()
    net.eval()
    assert net(x).shape == (8, 10)


@pytest.mark.parametrize(
    "make",
    [lambda: Conv1dNet(), lambda: MLP(40, 10), lambda: SmallCNN2d()],
    ids=["conv1d", "mlp", "cnn2d"],
)
def test_init_is_deterministic_given_seed(make: Callable[[], nn.Module]) -> None:
    torch.manual_seed(123)
    a = make().state_dict()
    torch.manual_seed(123)
    b = make().state_dict()
    torch.manual_seed(124)
    c = make().state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel())
