"""Muon: the update against its definition, torch's implementation, the routing on a CNN and
on GPT-2, and the optimizer's place in the Trainer (schedules, resume by parameter name)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
import torch
from conftest import bad_overrides_test, loaders, make_blobs, tiny_resnet
from speedup.algorithms.muon import (
    Muon,
    MuonOptimizer,
    _matrix_views,
    _OwnMuon,
    muon_optimizer,
    muon_routing,
    muon_update,
    newton_schulz,
)
from torch import nn

from speedup.callback import Callback
from speedup.config import ConfigError
from speedup.models import Classifier
from speedup.trainer import Trainer

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

pytestmark = pytest.mark.usefixtures("one_thread")

A, B, C = 3.4445, -4.7750, 2.0315


def _reference_ns(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Jordan's quintic iteration written out: normalise, then X <- aX + (bA + cA^2)X with
    A = X X^T, on the wide orientation, in float64 (the implementation runs bfloat16)."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(16, 48), (48, 16)])
def test_newton_schulz_follows_the_quintic_iteration(shape) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g)
    assert out.dtype == torch.bfloat16 and out.shape == g.shape
    reference = _reference_ns(g)
    assert torch.allclose(out.double(), reference, atol=0.03, rtol=0.03)
    # The coefficients do not converge: singular values land near [0.7, 1.2], not at 1.
    singular = torch.linalg.svdvals(out.float())
    assert singular.min() > 0.5 and singular.max() < 1.5
    assert (singular - 1).abs().max() > 0.05


@pytest.mark.parametrize(
    ("lr_scaling", "scale"),
    [("original", math.sqrt(48 / 16)), ("match_rms_adamw", 0.2 * math.sqrt(48))],
)
def test_one_muon_step_equals_the_definition(lr_scaling: str, scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    weight, grad = torch.randn(48, 16, generator=g), torch.randn(48, 16, generator=g)
    previous = torch.randn(48, 16, generator=g)  # a momentum buffer from earlier steps
    lr, wd, mu = 0.02, 0.1, 0.95
    buffer, updated = previous.clone(), weight.clone()
    muon_update(updated, grad, buffer, lr=lr, weight_decay=wd, momentum=mu, lr_scaling=lr_scaling)
    momentum = mu * previous + (1 - mu) * grad  # the EMA form
    nesterov = grad + mu * (momentum - grad)
    expected = weight * (1 - lr * wd) - lr * scale * _reference_ns(nesterov).float()
    assert torch.allclose(buffer, momentum, atol=1e-6)
    # bfloat16 iterations against float64: entries of O (about 0.1-0.5) agree within 0.025.
    assert torch.allclose(updated, expected, atol=lr * scale * 0.025, rtol=0)
    # Without Nesterov the buffer itself is orthogonalised.
    plain = weight.clone()
    muon_update(plain, grad, previous.clone(), lr=lr, momentum=mu, nesterov=False)
    expected_plain = weight - lr * math.sqrt(3) * _reference_ns(momentum).float()
    assert torch.allclose(plain, expected_plain, atol=lr * math.sqrt(3) * 0.025, rtol=0)
    assert not torch.allclose(plain, updated, atol=1e-4)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
@pytest.mark.parametrize("lr_scaling", ["original", "match_rms_adamw"])
def test_the_fallback_equals_torch_muon_bit_for_bit(lr_scaling: str) -> None:
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(24, 8, generator=g), torch.randn(8, 24, generator=g)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    copies = [[nn.Parameter(p.clone()) for p in params] for _ in range(2)]
    kwargs = dict(lr=0.05, weight_decay=0.1, momentum=0.9, adjust_lr_fn=lr_scaling)
    optimizers = [torch.optim.Muon(copies[0], **kwargs), _OwnMuon(copies[1], **kwargs)]
    for step in grads:
        for opt, ps in zip(optimizers, copies):
            for p, grad in zip(ps, step):
                p.grad = grad.clone()
            opt.step()
    for ours, theirs in zip(copies[1], copies[0]):
        assert torch.equal(ours, theirs)


def _cnn_routes() -> dict[str, str]:
    return muon_routing(tiny_resnet())


def test_routing_on_a_cnn_keeps_the_first_conv_head_biases_and_norms_off_muon() -> None:
    routes = _cnn_routes()
    model = tiny_resnet()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert routes[f"{convs[0]}.weight"] == "aux"  # the input layer
    assert all(routes[f"{n}.weight"] == "muon" for n in convs[1:])
    assert routes[f"{linears[-1]}.weight"] == "aux"  # the head
    params = dict(model.named_parameters())
    assert all(routes[n] == "aux" for n, p in params.items() if p.ndim < 2)  # biases, norms
    assert set(routes) == set(params)


def test_routing_on_gpt2_and_its_fused_attention_blocks() -> None:
    from speedup.models.language import gpt2
    from speedup.testing import _TEXT_INFO

    model = gpt2(_TEXT_INFO, size="tiny")
    routes = muon_routing(model)
    muon = {n for n, r in routes.items() if r == "muon"}
    assert muon and all(
        n.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "c_proj.weight"))
        for n in muon
    )
    assert all(routes[n] == "aux" for n in routes if "wte" in n or "wpe" in n or "ln_" in n)
    assert all(routes[n] == "aux" for n in routes if n.endswith(".bias"))
    assert not any("lm_head" in n for n in routes)  # tied to wte: trained once, with AdamW
    attn = next(m for n, m in model.named_modules() if n.endswith("attn.c_attn"))
    d = attn.nf // 3
    blocks = _matrix_views(model)[id(attn.weight)](attn.weight.detach())
    assert [tuple(b.shape) for b in blocks] == [(d, attn.weight.shape[0])] * 3  # (out, in)
    assert all(b.untyped_storage().data_ptr() == attn.weight.data_ptr() for b in blocks)
    assert torch.equal(blocks[1], attn.weight[:, d : 2 * d].T)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 4),
    )  # fmt: skip


def _step(net: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)
    x = x.contiguous(memory_format=torch.channels_last) if net[0].weight.ndim == 4 else x
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_conv_filters_are_stepped_as_flattened_matrices_and_the_rest_by_adamw() -> None:
    net = _net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    aux = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0}
    opt = muon_optimizer(net, aux, lr=0.05, weight_decay=0.1)
    assert isinstance(opt, MuonOptimizer)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)
    nn.functional.cross_entropy(net(x), y).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    for name in ("2.weight", "5.weight"):  # the hidden conv and the hidden linear layer
        weight = before[name].flatten(1).clone()
        muon_update(
            weight, grads[name].flatten(1), torch.zeros_like(weight), lr=0.05, weight_decay=0.1
        )
        assert torch.equal(dict(net.named_parameters())[name].flatten(1), weight)
    # AdamW's first step moves every other entry by about lr (g / (|g| + eps)).
    for name in ("0.weight", "0.bias", "7.weight", "2.bias"):
        moved = (dict(net.named_parameters())[name] - before[name]).abs()
        assert torch.allclose(moved[grads[name] != 0], torch.tensor(1e-3), rtol=1e-2)


def test_channels_last_filters_get_the_same_update() -> None:
    plain, channels_last = _net(), _net().to(memory_format=torch.channels_last)
    opts = [muon_optimizer(m, lr=0.05) for m in (plain, channels_last)]
    for seed in range(3):
        for net, opt in zip((plain, channels_last), opts):
            _step(net, opt, seed)
    for a, b in zip(plain.parameters(), channels_last.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_plain_loop_resumes_exactly_from_state_dict() -> None:
    whole, first = _net(), _net()
    opt = muon_optimizer(whole, lr=0.05)
    for seed in range(4):
        _step(whole, opt, seed)
    opt_first = muon_optimizer(first, lr=0.05)
    for seed in range(2):
        _step(first, opt_first, seed)
    saved = opt_first.state_dict()
    assert set(saved["muon"]) == {"2.weight", "5.weight"}
    assert len(saved["param_groups"]) == 1 and len(saved["param_groups"][0]["params"]) == 8
    second = _net()
    second.load_state_dict(first.state_dict())
    opt_second = muon_optimizer(second, lr=0.05)
    opt_second.load_state_dict(saved)
    for seed in range(2, 4):
        _step(second, opt_second, seed)
    for a, b in zip(whole.parameters(), second.parameters()):
        assert torch.equal(a, b)


class _GroupLRs(Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self.lrs.append([g["lr"] for g in state.optimizer.param_groups])


def _mlp() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    return Classifier(net, 4, kind="mlp")


def test_in_the_trainer_muon_follows_the_schedule_and_saves_momentum_by_name() -> None:
    tap = _GroupLRs()
    train, _ = loaders(make_blobs(n=64), batch_size=8)
    algorithm = Muon(lr=0.04)
    trainer = Trainer(
        _mlp(),
        train,
        "16ba",
        optimizer={"name": "adamw", "lr": 1e-3},
        scheduler={"name": "cosine", "warmup": "4ba"},
        algorithms=[algorithm],
        callbacks=[tap],
        device="cpu",
    )
    trainer.fit()
    assert isinstance(trainer.state.optimizer, MuonOptimizer)
    assert len(tap.lrs) == 16 and all(len(lrs) == 2 for lrs in tap.lrs)
    for aux, muon in tap.lrs:  # one multiplier for both groups: warmup, then cosine
        assert muon / 0.04 == pytest.approx(aux / 1e-3)
    assert tap.lrs[0][1] == pytest.approx(0.04 / 4) and tap.lrs[4][1] == pytest.approx(0.04)
    momentum = algorithm.state_dict()["momentum"]
    assert set(momentum) == {"net.2.weight"}  # the only hidden matrix
    assert momentum["net.2.weight"][0].shape == (16, 16)


test_bad_muon_arguments_fail_before_training = bad_overrides_test(
    [
        ("algorithms.muon.lr_scaling=spectral", "muon.lr_scaling: unknown 'spectral'; allowed"),
        ("algorithms.muon.momentum=1.0", "muon.momentum: a number in [0, 1)"),
        ("algorithms.muon.ns_steps=0", "muon.ns_steps"),
    ],
)


def test_a_model_without_hidden_matrices_is_refused() -> None:
    train, _ = loaders(make_blobs(n=32), batch_size=8)
    torch.manual_seed(0)
    head_only = Classifier(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), 4)
    trainer = Trainer(head_only, train, "2ba", algorithms=[Muon()], device="cpu")
    with pytest.raises(ConfigError, match="no hidden weight matrix"):
        trainer.fit()
