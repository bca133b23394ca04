import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import bad_arguments_test, optimizer_parameter_ids, sgd_image_trainer, tiny_resnet
from speedup.algorithms.blurpool import (
    BlurConv2d,
    BlurMaxPool2d,
    BlurPool,
    apply_blurpool,
    blur_2d,
    blur_filter,
)
from torch import nn

from speedup.engine import build_plan
from speedup.event import Event

BINOMIAL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16


class Net(nn.Module):
    """A stem on the raw image, a wide strided conv, an unstrided conv, a max-pool."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)  # 3 input channels: kept
        self.down = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False)
        self.same = nn.Conv2d(24, 24, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        x = self.pool(self.same(F.relu(self.down(F.relu(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


def test_blur_filter_is_the_normalised_binomial():
    filt = blur_filter(5)
    assert filt.shape == (5, 1, 3, 3)
    for kernel in filt:
        assert torch.equal(kernel[0], BINOMIAL)
        assert kernel.sum().item() == 1.0
    # a constant image stays constant away from the (zero-padded) border
    flat = blur_2d(torch.full((1, 2, 6, 6), 3.0))
    assert torch.allclose(flat[..., 1:-1, 1:-1], torch.tensor(3.0))


def test_blur_removes_the_aliasing_of_a_nyquist_pattern():
    # A checkerboard subsampled at stride 2 is all ones or all zeros depending on a one-pixel
    # shift: the classic aliasing failure. Blurred first, both shifts give 0.5 everywhere.
    i = torch.arange(10)
    board = ((i[:, None] + i[None, :]) % 2 == 0).float()[None, None]
    shifted = torch.roll(board, 1, dims=-1)
    pick = torch.ones(1, 1, 1, 1)
    plain = [F.conv2d(x, pick, stride=2)[..., 1:-1, 1:-1] for x in (board, shifted)]
    assert plain[0].unique().tolist() == [1.0] and plain[1].unique().tolist() == [0.0]
    blurred = [F.conv2d(blur_2d(x), pick, stride=2)[..., 1:-1, 1:-1] for x in (board, shifted)]
    assert torch.equal(blurred[0], blurred[1])
    assert blurred[0].unique().tolist() == [0.5]


@pytest.mark.parametrize("blur_first", [True, False])
@pytest.mark.parametrize("size", [8, 9])
def test_blurred_conv_matches_the_reference_computation(blur_first, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 16, size, size)
    blurred = BlurConv2d.from_conv(conv, blur_first=blur_first)
    assert blurred.weight is conv.weight and blurred.bias is conv.bias  # shared, not copied
    if blur_first:  # blur the input at stride 1, then the original strided conv
        smooth = F.conv2d(x, BINOMIAL.expand(16, 1, 3, 3), padding=1, groups=16)
        expected = F.conv2d(smooth, conv.weight, conv.bias, stride=2, padding=1)
        assert blurred.stride == (2, 2)
    else:  # the conv at stride 1, then blur with stride 2
        full = F.conv2d(x, conv.weight, conv.bias, stride=1, padding=1)
        expected = F.conv2d(full, BINOMIAL.expand(8, 1, 3, 3), stride=2, padding=1, groups=8)
        assert blurred.stride == (1, 1) and blurred.blur_stride == (2, 2)
    out = blurred(x)
    assert out.shape == conv(x).shape
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("size", [8, 7])
def test_blur_maxpool_matches_the_reference_and_the_shape(size):
    x = torch.randn(2, 3, size, size)
    pool = nn.MaxPool2d(2)
    blurred = BlurMaxPool2d.from_maxpool(pool)
    peaks = F.max_pool2d(x, 2, stride=1)
    expected = F.conv2d(peaks, BINOMIAL.expand(3, 1, 3, 3), stride=2, padding=1, groups=3)
    out = blurred(x)
    assert out.shape == pool(x).shape
    torch.testing.assert_close(out, expected)
    # the pool has no tensors of its own: nothing in its state dict before or after a forward
    assert blurred.state_dict() == {} and list(blurred.buffers()) == []


def test_surgery_replaces_only_wide_strided_layers_and_keeps_the_parameters():
    torch.manual_seed(0)
    net = Net()
    original = copy.deepcopy(net)
    keys = set(net.state_dict())
    counts = apply_blurpool(net)
    assert counts == {"convs": 1, "maxpools": 1}
    assert type(net.stem) is nn.Conv2d  # 3 < min_channels 16
    assert isinstance(net.down, BlurConv2d) and type(net.same) is nn.Conv2d
    assert isinstance(net.pool, BlurMaxPool2d)
    assert set(net.state_dict()) == keys  # checkpoints and pretrained weights still load
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in original.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == original(x).shape
    assert not torch.allclose(net(x), original(x))  # it does change the function
    # applying again finds nothing new
    assert apply_blurpool(net) == {"convs": 0, "maxpools": 0}
    # the switches
    only_pools = copy.deepcopy(original)
    assert apply_blurpool(only_pools, replace_convs=False) == {"convs": 0, "maxpools": 1}
    all_convs = copy.deepcopy(original)
    assert apply_blurpool(all_convs, replace_maxpools=False, min_channels=1) == {
        "convs": 2,
        "maxpools": 0,
    }


def test_pools_with_ceil_mode_or_indices_are_left_alone():
    seq = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool2d(2, return_indices=True))
    assert apply_blurpool(seq) == {"convs": 0, "maxpools": 0}


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    BlurPool,
    [
        ({"min_channels": 0}, "blurpool.min_channels must be an integer >= 1, got 0"),
        ({"min_channels": 2.5}, "blurpool.min_channels"),
        ({"replace_convs": False, "replace_maxpools": False}, "at least one must be True"),
    ],
)


def test_declaration_is_surgery_at_init_for_conv_nets_on_images():
    decl = BlurPool().declare()
    assert set(decl.events) == {Event.INIT}
    assert decl.events[Event.INIT].writes == {"model.modules"}
    assert decl.model_kinds == {"cnn"} and decl.data_kinds == {"image"}
    plan = build_plan({"blurpool": decl}, model_kind="bert", data_kind="text")
    assert [c.kind for c in plan.conflicts] == ["not-applicable", "not-applicable"]


def test_twenty_steps_train_through_the_blurred_layers():
    model = tiny_resnet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    blurpool = BlurPool(min_channels=8)
    trainer = sgd_image_trainer(model, blurpool)
    model = trainer.state.model
    blurred = [m for m in model.modules() if isinstance(m, BlurConv2d)]
    assert blurpool.replaced == {"convs": 2, "maxpools": 0} and len(blurred) == 2
    # the optimizer holds exactly the model's trainable parameters, the same tensors
    held = optimizer_parameter_ids(trainer)
    assert held == [id(p) for p in model.parameters() if p.requires_grad]
    assert set(before) == {n for n, _ in model.named_parameters()}
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in blurred]
    trainer.fit()
    for handle in handles:
        handle.remove()
    assert len(calls) == 2 * 20  # every step ran through both blurred convolutions
    assert torch.isfinite(trainer.state.train_metrics["loss"])
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]), name  # every parameter trained
