import pytest
import torch
import torch.nn.functional as F
from conftest import image_loader, optimizer_parameter_ids
from speedup.algorithms.ghost_batchnorm import (
    GhostBatchNorm,
    GhostBatchNorm2d,
    apply_ghost_batchnorm,
    ghost_batch_norm,
)
from torch import nn

from speedup.callback import Callback
from speedup.event import Event
from speedup.models import Classifier
from speedup.models.nets import SmallCNN2d
from speedup.trainer import Trainer


def per_chunk(x, size, weight, bias, eps=1e-5):
    """The definition: plain training-mode BatchNorm on each chunk of ``size`` samples."""
    return torch.cat(
        [F.batch_norm(c, None, None, weight, bias, True, 0.0, eps) for c in x.split(size)]
    )


@pytest.mark.parametrize("n", [12, 14])  # a multiple of the ghost size, and a remainder of 2
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_equals_batchnorm_on_each_ghost_batch(n, layout):
    torch.manual_seed(0)
    x = torch.randn(n, 3, 5, 5) * 2 + torch.arange(n).view(n, 1, 1, 1)  # chunks differ
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    out = ghost_batch_norm(x, 4, weight, bias)
    expected = per_chunk(x, 4, weight, bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # ... and it differs from BatchNorm over the whole batch
    whole = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)
    assert not torch.allclose(out, whole, atol=1e-2)


def test_gradients_equal_those_of_per_chunk_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(10, 3, 4, 4, requires_grad=True)
    weight = torch.rand(3, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    upstream = torch.randn(10, 3, 4, 4)
    grads = []
    for fn in (lambda: ghost_batch_norm(x, 4, weight, bias), lambda: per_chunk(x, 4, weight, bias)):
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
    chunks = x.split(4)
    means = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    unbiased = torch.stack([c.var((0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(bn.running_mean, 0.75 * torch.zeros(3) + 0.25 * means)
    torch.testing.assert_close(bn.running_var, 0.75 * torch.ones(3) + 0.25 * unbiased)
    assert int(bn.num_batches_tracked) == 1


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


@pytest.mark.parametrize("size", [0, -4, 2.5, True])
def test_bad_ghost_batch_size_raises_naming_the_argument(size):
    with pytest.raises(ValueError, match="ghost_batchnorm.ghost_batch_size must be an integer"):
        GhostBatchNorm(ghost_batch_size=size)


def test_declaration():
    decl = GhostBatchNorm().declare()
    assert decl.events[Event.INIT].writes == {"model.modules"}
    assert decl.model_kinds == {"cnn"} and decl.data_kinds == {"image"}


class Check(Callback):
    """In each training forward, the first ghost layer's output is per-chunk BatchNorm."""

    def __init__(self):
        self.errors, self.handle = [], None

    def fit_start(self, state, logger):
        layer = next(m for m in state.model.modules() if isinstance(m, GhostBatchNorm2d))

        def hook(module, inputs, output):
            if module.training:
                expected = per_chunk(inputs[0], 4, module.weight, module.bias)
                self.errors.append((output - expected).abs().max().item())

        self.handle = layer.register_forward_hook(hook)


def test_twenty_steps_normalise_per_ghost_batch():
    torch.manual_seed(0)
    model = Classifier(SmallCNN2d(3, 4, channels=8), 4, kind="cnn")
    check = Check()
    ghost = GhostBatchNorm(ghost_batch_size=4)
    trainer = Trainer(
        model,
        image_loader(n=64, batch_size=16),
        "20ba",
        algorithms=[ghost],
        callbacks=[check],
        optimizer={"name": "sgd", "lr": 0.05},
        device="cpu",
        data_kind="image",
    )
    assert ghost.replaced == 4
    held = optimizer_parameter_ids(trainer)
    assert held == [id(p) for p in trainer.state.model.parameters()]
    layer = next(m for m in model.modules() if isinstance(m, GhostBatchNorm2d))
    trainer.fit()
    assert len(check.errors) == 20 and max(check.errors) < 1e-4
    assert int(layer.num_batches_tracked) == 20
    assert not torch.equal(layer.running_mean, torch.zeros_like(layer.running_mean))
    assert torch.isfinite(trainer.state.train_metrics["loss"])
