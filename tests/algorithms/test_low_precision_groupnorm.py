import pytest
import torch
from conftest import algorithm_trainer, groupnorm_net, image_loader, optimizer_parameter_ids
from speedup.algorithms.low_precision_groupnorm import (
    LowPrecisionGroupNorm,
    LPGroupNorm,
    apply_low_precision_groupnorm,
    low_precision_group_norm,
)
from torch import nn

from speedup.callback import Callback
from speedup.event import Event
from speedup.models import Classifier
from speedup.trainer import Trainer


def gn_net():
    return groupnorm_net(2, 4)


def affine_groupnorm(groups=2, channels=8):
    torch.manual_seed(0)
    norm = nn.GroupNorm(groups, channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    return norm


def test_under_autocast_it_runs_in_bf16_and_stays_close_to_fp32():
    norm = affine_groupnorm()
    low = LPGroupNorm.from_groupnorm(norm)
    x = torch.randn(4, 8, 6, 6) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = norm(x)  # an fp32 input stays fp32 in plain group_norm
        out = low(x)
        from_bf16 = low(x.bfloat16())
    assert plain.dtype == torch.float32
    assert out.dtype == from_bf16.dtype == torch.bfloat16
    reference = norm(x)  # fp32 throughout
    torch.testing.assert_close(out.float(), reference, rtol=0.02, atol=0.03)
    torch.testing.assert_close(from_bf16.float(), reference, rtol=0.02, atol=0.05)
    assert not torch.equal(out.float(), reference)  # it really computed in bf16


def test_outside_autocast_it_is_exactly_groupnorm():
    norm = affine_groupnorm()
    low = LPGroupNorm.from_groupnorm(norm)
    x = torch.randn(4, 8, 6, 6)
    assert torch.equal(low(x), norm(x))
    assert low(x).dtype == torch.float32
    assert torch.equal(low_precision_group_norm(x, 2, norm.weight, norm.bias), norm(x))


def test_surgery_shares_the_parameters_and_keeps_the_keys():
    net = gn_net()
    norms = [m for m in net.modules() if type(m) is nn.GroupNorm]
    keys = list(net.state_dict())
    assert apply_low_precision_groupnorm(net) == 2
    lows = [m for m in net.modules() if isinstance(m, LPGroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in lows] == [(2, 8), (4, 8)]
    assert all(new.weight is old.weight for new, old in zip(lows, norms))
    assert list(net.state_dict()) == keys
    assert apply_low_precision_groupnorm(net) == 0


def test_declaration_reads_the_precision():
    decl = LowPrecisionGroupNorm().declare()
    assert decl.events[Event.INIT].reads >= {"precision", "model.modules"}
    assert decl.events[Event.INIT].writes == {"model.modules"}
    assert decl.model_kinds == {"cnn"} and decl.data_kinds == {"image"}


def test_at_fp32_it_does_nothing_and_says_so():
    model = Classifier(gn_net(), 4, kind="cnn")
    algorithm = LowPrecisionGroupNorm()
    with pytest.warns(UserWarning, match="no effect at precision 'fp32'"):
        trainer = Trainer(model, image_loader(size=8), "1ba", algorithms=[algorithm], device="cpu")
    assert algorithm.replaced == 0
    assert not any(isinstance(m, LPGroupNorm) for m in trainer.state.model.modules())


class Dtypes(Callback):
    def __init__(self):
        self.seen, self.losses = [], []

    def fit_start(self, state, logger):
        norm = next(m for m in state.model.modules() if isinstance(m, LPGroupNorm))
        norm.register_forward_hook(lambda m, i, o: self.seen.append(o.dtype))

    def after_loss(self, state, logger):
        self.losses.append(state.loss.detach().float().item())


def test_twenty_bf16_steps_run_groupnorm_in_bf16():
    torch.manual_seed(0)
    model = Classifier(gn_net(), 4, kind="cnn")
    algorithm = LowPrecisionGroupNorm()
    dtypes = Dtypes()
    trainer = algorithm_trainer(
        model,
        image_loader(size=8),
        algorithm,
        callbacks=[dtypes],
        precision="bf16",
        data_kind="image",
    )
    assert algorithm.replaced == 2
    held = optimizer_parameter_ids(trainer)
    assert held == [id(p) for p in trainer.state.model.parameters()]
    norm = next(m for m in trainer.state.model.modules() if isinstance(m, LPGroupNorm))
    start = norm.weight.detach().clone()
    trainer.fit()
    assert dtypes.seen == [torch.bfloat16] * 20
    assert norm.weight.dtype == torch.float32  # the master weights stay fp32
    assert not torch.equal(norm.weight, start)  # and train through the bf16 op
    assert all(torch.isfinite(torch.tensor(dtypes.losses)))
