import pytest
import torch
import torch.nn.functional as F
from conftest import algorithm_trainer, image_loader, optimizer_parameter_ids
from speedup.algorithms.ghost_batchnorm import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    apply_ghost_batchnorm,
    ghost_batch_norm,
    ghost_sizes,
)
from torch import nn

from speedup.callback import Callback
from speedup.event import Event
from speedup.models import Classifier
from speedup.models.nets import SmallCNN2d


def per_chunk(x, sizes, weight=None, bias=None, eps=1e-5):
    """Hoffer et al.'s Algorithm 1 from its definition: each consecutive ghost batch of the
    given sizes is normalised with its own per-channel mean and biased variance over its
    samples and positions, then scaled and shifted."""
    outputs = []
    for chunk in x.split(sizes):
        dims = [0, *range(2, x.dim())]
        mean = chunk.mean(dims, keepdim=True)
        var = (chunk - mean).square().mean(dims, keepdim=True)
        out = (chunk - mean) / torch.sqrt(var + eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if weight is not None:
            out = out * weight.view(shape) + bias.view(shape)
        outputs.append(out)
    return torch.cat(outputs)


# (N, ghost size, the ghost batch sizes): ceil(N / ghost) ghosts, sizes differing by <= 1
SPLITS = [(12, 4, [4, 4, 4]), (14, 4, [4, 4, 3, 3]), (10, 4, [4, 3, 3]), (100, 32, [25] * 4)]


@pytest.mark.parametrize(("n", "ghost", "sizes"), SPLITS)
def test_ghost_sizes_are_nearly_equal(n, ghost, sizes):
    assert ghost_sizes(n, ghost) == sizes


@pytest.mark.parametrize(("n", "ghost", "sizes"), SPLITS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_equals_batchnorm_on_each_ghost_batch(n, ghost, sizes, layout):
    torch.manual_seed(0)
    x = torch.randn(n, 3, 5, 5) * 2 + torch.arange(n).view(n, 1, 1, 1)  # chunks differ
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    out = ghost_batch_norm(x, ghost, weight, bias)
    torch.testing.assert_close(out, per_chunk(x, sizes, weight, bias), rtol=1e-5, atol=1e-5)
    # ... and it differs from BatchNorm over the whole batch
    whole = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)
    assert not torch.allclose(out, whole, atol=1e-2)
    if n % ghost:  # ... and from full ghosts plus a short remainder (32, 32, 32, 4)
        remainder = [ghost] * (n // ghost) + [n % ghost]
        assert not torch.allclose(out, per_chunk(x, remainder, weight, bias), atol=1e-2)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (GhostBatchNorm1d, (14, 3)),
        (GhostBatchNorm1d, (14, 3, 6)),
        (GhostBatchNorm3d, (14, 3, 2, 3, 4)),
    ],
)
def test_1d_and_3d_layers_normalise_per_ghost_batch_with_running_statistics(layer, shape):
    torch.manual_seed(0)
    bn = layer(3, ghost_batch_size=4, momentum=0.5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(*shape) * 3 + torch.arange(shape[0]).view(-1, *[1] * (len(shape) - 1))
    out = bn.train()(x)
    torch.testing.assert_close(out, per_chunk(x, [4, 4, 3, 3], bn.weight, bn.bias))
    dims = [0, *range(2, x.dim())]
    chunks = x.split([4, 4, 3, 3])
    means = torch.stack([c.mean(dims) for c in chunks]).mean(0)
    unbiased = torch.stack([c.var(dims, unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(bn.running_mean, 0.5 * means)
    torch.testing.assert_close(bn.running_var, 0.5 + 0.5 * unbiased)
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False)
    torch.testing.assert_close(bn.eval()(x), expected)


def test_gradients_equal_those_of_per_chunk_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(10, 3, 4, 4, requires_grad=True)
    weight = torch.rand(3, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    upstream = torch.randn(10, 3, 4, 4)
    grads = []
    for fn in (
        lambda: ghost_batch_norm(x, 4, weight, bias),
        lambda: per_chunk(x, [4, 3, 3], weight, bias),
    ):
        (fn() * upstream).sum().backward()
        grads.append([t.grad.clone() for t in (x, weight, bias)])
        for t in (x, weight, bias):
            t.grad = None
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_running_statistics_move_towards_the_average_ghost_statistics():
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(3, ghost_batch_size=4, momentum=0.25)
    x = torch.randn(12, 3, 5, 5) + torch.arange(12).view(12, 1, 1, 1)
    bn.train()(x)
    chunks = x.split(4)  # 12 in ghosts of 4: three of 4
    means = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    unbiased = torch.stack([c.var((0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(bn.running_mean, 0.75 * torch.zeros(3) + 0.25 * means)
    torch.testing.assert_close(bn.running_var, 0.75 * torch.ones(3) + 0.25 * unbiased)
    assert int(bn.num_batches_tracked) == 1


def test_running_statistics_of_an_uneven_batch_average_its_ghost_batches():
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(3, ghost_batch_size=32, momentum=0.25)
    x = torch.randn(100, 3, 2, 2) + torch.arange(100).view(100, 1, 1, 1) / 10
    bn.train()(x)
    chunks = x.split([25, 25, 25, 25])  # not 32, 32, 32, 4
    means = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    unbiased = torch.stack([c.var((0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(bn.running_mean, 0.25 * means)
    torch.testing.assert_close(bn.running_var, 0.75 + 0.25 * unbiased)


def test_momentum_none_is_a_cumulative_average_like_batchnorm():
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(2, ghost_batch_size=3, momentum=None)
    batches = [torch.randn(6, 2, 3, 3) + i for i in range(3)]
    for batch in batches:
        bn.train()(batch)
    per_step = [torch.stack([c.mean((0, 2, 3)) for c in b.split(3)]).mean(0) for b in batches]
    torch.testing.assert_close(bn.running_mean, torch.stack(per_step).mean(0))


def test_eval_uses_the_running_statistics():
    torch.manual_seed(0)
    bn = GhostBatchNorm2d(3, ghost_batch_size=4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    for _ in range(3):
        bn.train()(torch.randn(16, 3, 4, 4) * 3 + 1)
    x = torch.randn(8, 3, 4, 4)
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False)
    tracked = int(bn.num_batches_tracked)
    torch.testing.assert_close(bn.eval()(x), expected)
    assert int(bn.num_batches_tracked) == tracked  # eval does not count as a batch


def test_small_batches_are_plain_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    ghost, plain = GhostBatchNorm2d(3, ghost_batch_size=8), nn.BatchNorm2d(3)
    torch.testing.assert_close(ghost(x), plain(x))
    torch.testing.assert_close(ghost.running_var, plain.running_var)


def test_surgery_shares_the_tensors_and_keeps_the_keys():
    torch.manual_seed(0)
    net = SmallCNN2d(3, 4, channels=4)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    keys = list(net.state_dict())
    assert apply_ghost_batchnorm(net, 8) == len(norms) == 4
    ghosts = [m for m in net.modules() if isinstance(m, GhostBatchNorm2d)]
    assert len(ghosts) == 4 and all(g.ghost_batch_size == 8 for g in ghosts)
    for old, new in zip(norms, ghosts):
        assert new.weight is old.weight and new.running_mean is old.running_mean
    assert list(net.state_dict()) == keys
    assert apply_ghost_batchnorm(net, 8) == 0  # already ghost


def test_surgery_replaces_batchnorm_1d_2d_and_3d_but_not_syncbatchnorm():
    net = nn.Sequential(
        nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4), nn.SyncBatchNorm(4)
    )
    assert apply_ghost_batchnorm(net, 8) == 3
    kinds = [GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, nn.SyncBatchNorm]
    assert [type(m) for m in net] == kinds
    assert isinstance(net[0], nn.BatchNorm1d) and isinstance(net[2], nn.BatchNorm3d)
    with pytest.raises(ValueError, match="expected 4D input"):
        net[1](torch.randn(8, 4))  # each keeps its own BatchNorm input check


@pytest.mark.parametrize("size", [0, -4, 2.5, True])
def test_bad_ghost_batch_size_raises_naming_the_argument(size):
    with pytest.raises(ValueError, match="ghost_batchnorm.ghost_batch_size must be an integer"):
        GhostBatchNorm(ghost_batch_size=size)


def test_declaration():
    decl = GhostBatchNorm().declare()
    assert decl.events[Event.INIT].writes == {"model.modules"}
    assert decl.model_kinds == {"cnn"} and decl.data_kinds == {"image", "signal"}


class Check(Callback):
    """In each training forward, the first ghost layer's output is per-chunk BatchNorm."""

    def __init__(self):
        self.errors, self.handle = [], None

    def fit_start(self, state, logger):
        layer = next(m for m in state.model.modules() if isinstance(m, GhostBatchNorm2d))

        def hook(module, inputs, output):
            if module.training:
                assert inputs[0].shape[0] == 16  # four ghost batches of 4
                expected = per_chunk(inputs[0], [4] * 4, module.weight, module.bias)
                self.errors.append((output - expected).abs().max().item())

        self.handle = layer.register_forward_hook(hook)


def test_twenty_steps_normalise_per_ghost_batch():
    torch.manual_seed(0)
    model = Classifier(SmallCNN2d(3, 4, channels=8), 4, kind="cnn")
    check = Check()
    ghost = GhostBatchNorm(ghost_batch_size=4)
    loader = image_loader(n=64, batch_size=16)
    trainer = algorithm_trainer(model, loader, ghost, callbacks=[check], data_kind="image")
    assert ghost.replaced == 4
    held = optimizer_parameter_ids(trainer)
    assert held == [id(p) for p in trainer.state.model.parameters()]
    layer = next(m for m in model.modules() if isinstance(m, GhostBatchNorm2d))
    trainer.fit()
    assert len(check.errors) == 20 and max(check.errors) < 1e-4
    assert int(layer.num_batches_tracked) == 20
    assert not torch.equal(layer.running_mean, torch.zeros_like(layer.running_mean))
    assert torch.isfinite(trainer.state.train_metrics["loss"])
