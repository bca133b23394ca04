import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import bad_arguments_test, optimizer_parameter_ids, sgd_image_trainer, tiny_resnet
from speedup.algorithms.stochastic_depth import (
    StochasticBlock,
    StochasticDepth,
    apply_stochastic_depth,
    block_drop_rates,
    drop_path,
)
from torch import nn

from speedup.callback import Callback
from speedup.event import Event
from speedup.models.vision import CifarResNet


def test_linear_rule_rises_to_drop_rate_at_the_last_block():
    assert block_drop_rates(4, 0.2) == pytest.approx([0.05, 0.1, 0.15, 0.2], abs=1e-15)
    assert block_drop_rates(3, 0.3, "uniform") == [0.3, 0.3, 0.3]
    with pytest.raises(ValueError, match="distribution"):
        block_drop_rates(3, 0.1, "cubic")


@pytest.mark.parametrize("distribution", ["linear", "uniform"])
def test_blocks_get_the_schedule_in_depth_order(distribution):
    net = CifarResNet(3, num_classes=4, width=4)  # ResNet-20: 9 blocks
    originals = list(net.blocks)
    blocks = apply_stochastic_depth(net, 0.45, distribution, "block")
    assert len(blocks) == 9 and list(net.blocks) == blocks
    expected = [0.45 * (i + 1) / 9 if distribution == "linear" else 0.45 for i in range(9)]
    assert [b.drop_rate for b in blocks] == pytest.approx(expected, abs=1e-15)
    assert [b.target_drop_rate for b in blocks] == [b.drop_rate for b in blocks]
    assert all(b.method == "block" for b in blocks)
    # the blocks' submodules are adopted: same objects, same state-dict keys
    assert all(b.conv1 is o.conv1 and b.bn2 is o.bn2 for b, o in zip(blocks, originals))


def torchvision_blocks():
    """Both torchvision block types, with identity and projection shortcuts."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    def projection(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out))

    return nn.Sequential(
        BasicBlock(8, 8),
        BasicBlock(8, 16, stride=2, downsample=projection(8, 16)),
        Bottleneck(16, 4),  # 4 * expansion 4 = 16 channels out
        Bottleneck(16, 8, stride=2, downsample=projection(16, 32)),
    )


def test_torchvision_blocks_keep_keys_and_are_exact_in_eval():
    torch.manual_seed(0)
    net = torchvision_blocks()
    for module in net.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(module, nn.BatchNorm2d):
            for tensor in (module.running_mean, module.weight, module.bias):
                tensor.data.uniform_(-0.5, 0.5)
            module.running_var.data.uniform_(0.5, 2.0)
    reference = copy.deepcopy(net).eval()
    keys = list(net.state_dict())
    blocks = apply_stochastic_depth(net, 0.5, "linear", "sample")
    assert [b.layout for b in blocks] == ["basic", "basic", "bottleneck", "bottleneck"]
    assert [b.drop_rate for b in blocks] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert list(net.state_dict()) == keys
    x = torch.randn(2, 8, 8, 8)
    net.eval()
    with torch.no_grad():
        first, second = net(x), net(x)
        assert torch.equal(first, second)  # eval is deterministic: no drop
        assert torch.equal(first, reference(x))  # and is the plain network
        net.train()
        assert not torch.equal(net(x), net(x))  # training draws


def test_drop_rate_zero_is_the_identity_in_training_too():
    torch.manual_seed(0)
    net = CifarResNet(1, num_classes=4, width=4)
    reference = copy.deepcopy(net)
    apply_stochastic_depth(net, 0.0)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(net.train()(x), reference.train()(x))


def test_sample_wise_drops_are_zero_or_rescaled_and_unbiased():
    torch.manual_seed(0)
    x = torch.full((40000, 1), 3.0)
    out = drop_path(x, 0.25)
    assert set(out.unique().tolist()) == {0.0, 4.0}  # dropped, or scaled by 1 / (1 - 0.25)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.25) < 4 * (0.25 * 0.75 / 40000) ** 0.5
    assert abs(out.mean().item() - 3.0) < 4 * 3.0 * (0.25 / 0.75 / 40000) ** 0.5
    assert drop_path(x, 0.25, training=False) is x


def test_a_sample_wise_block_keeps_or_drops_each_sample_whole():
    torch.manual_seed(0)
    net = CifarResNet(1, num_classes=4, width=4)
    block = apply_stochastic_depth(net, 0.5, "uniform", "sample")[0].train()
    x = torch.randn(64, 4, 8, 8)
    with torch.no_grad():
        branch, identity = block.branch(x), block.shortcut(x)
        out = block(x)
    kept = F.relu(branch / 0.5 + identity)
    dropped = F.relu(identity)
    per_sample_kept = torch.isclose(out, kept, atol=1e-6).flatten(1).all(1)
    per_sample_dropped = torch.isclose(out, dropped, atol=1e-6).flatten(1).all(1)
    assert torch.all(per_sample_kept | per_sample_dropped)
    assert 0 < per_sample_dropped.sum() < 64


def test_a_block_wise_block_skips_the_branch_at_its_rate():
    torch.manual_seed(0)
    net = CifarResNet(1, num_classes=4, width=4)
    block = apply_stochastic_depth(net, 0.3, "uniform", "block")[0].train()
    runs = []
    block.conv1.register_forward_hook(lambda *_: runs.append(1))
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        for _ in range(1000):
            block(x)
    skipped = 1 - len(runs) / 1000
    assert abs(skipped - 0.3) < 4 * (0.3 * 0.7 / 1000) ** 0.5


class Rates(Callback):
    def __init__(self):
        self.seen = []

    def before_forward(self, state, logger):
        blocks = [m for m in state.model.modules() if isinstance(m, StochasticBlock)]
        self.seen.append((state.timestamp.batch, [b.drop_rate for b in blocks]))


def train(algorithm, steps=20, callbacks=(), width=4):
    return sgd_image_trainer(tiny_resnet(width), algorithm, steps, callbacks)


def test_warmup_ramps_every_rate_linearly_over_its_time():
    sd = StochasticDepth(drop_rate=0.6, drop_warmup="10ba")
    assert Event.BEFORE_TRAIN_BATCH in sd.declare().events
    rates = Rates()
    trainer = train(sd, steps=12, callbacks=[rates])
    assert [b.drop_rate for b in sd.blocks] == [0.0, 0.0, 0.0]  # before the first batch
    trainer.fit()
    targets = [0.2, 0.4, 0.6]
    for batch, seen in rates.seen:
        factor = min(1.0, batch / 10)
        assert seen == pytest.approx([t * factor for t in targets], abs=1e-12), batch
    # a fresh trainer positioned at step 5 (a resume) sets the rates from the clock alone
    resumed_rates = Rates()
    later = train(StochasticDepth(drop_rate=0.6, drop_warmup="10ba"), 6, [resumed_rates])
    later.seek(5)
    later.fit()
    assert resumed_rates.seen[0] == (5, pytest.approx([0.1, 0.2, 0.3], abs=1e-12))


def test_without_warmup_only_init_is_declared():
    decl = StochasticDepth().declare()
    assert set(decl.events) == {Event.INIT}
    assert decl.events[Event.INIT].writes == {"model.modules"}
    assert decl.model_kinds == {"cnn"} and decl.data_kinds == {"image"}


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    StochasticDepth,
    [
        ({"drop_rate": 1.0}, r"stochastic_depth.drop_rate must be in \[0, 1\), got 1.0"),
        ({"drop_rate": -0.1}, "stochastic_depth.drop_rate"),
        ({"drop_distribution": "cubic"}, "stochastic_depth.drop_distribution must be one of"),
        ({"method": "layer"}, "stochastic_depth.method must be one of sample, block"),
        ({"drop_warmup": "5sec"}, "stochastic_depth.drop_warmup"),
        ({"drop_warmup": "soon"}, "stochastic_depth.drop_warmup"),
    ],
)


def test_twenty_block_wise_steps_skip_branches_and_train():
    sd = StochasticDepth(drop_rate=0.5, method="block")
    trainer = train(sd, width=8)
    model = trainer.state.model
    assert len(sd.blocks) == 3
    held = optimizer_parameter_ids(trainer)
    assert held == [id(p) for p in model.parameters() if p.requires_grad]
    branch_runs = [0, 0, 0]
    for i, block in enumerate(sd.blocks):
        block.conv1.register_forward_hook(
            lambda *_, i=i: branch_runs.__setitem__(i, branch_runs[i] + 1)
        )
    trainer.fit()
    assert torch.isfinite(trainer.state.train_metrics["loss"])
    # rates 1/6, 1/3, 1/2: the last block's branch ran in about half of the 20 steps
    assert branch_runs[2] < 20 and all(0 < n <= 20 for n in branch_runs)
    assert branch_runs[0] >= branch_runs[2]
