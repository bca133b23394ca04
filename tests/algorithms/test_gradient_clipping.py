import math

import pytest
import torch
from conftest import algorithm_trainer, loaders, make_blobs, plan_of, stand_in, tiny_model
from speedup.algorithms.gradient_clipping import (
    DEFAULT_THRESHOLDS,
    GradientClipping,
    adaptive_clip_grad_,
    apply_gradient_clipping,
    unitwise_norm,
)
from torch import nn

from speedup.callback import Callback
from speedup.event import Event
from speedup.trainer import Trainer


def with_grad(values, grad):
    p = nn.Parameter(torch.tensor(values, dtype=torch.float32))
    p.grad = torch.tensor(grad, dtype=torch.float32)
    return p


# -- the math ---------------------------------------------------------------------------------


def test_norm_clipping_scales_all_gradients_by_threshold_over_global_norm():
    a, b = with_grad([0.0, 0.0], [3.0, 4.0]), with_grad([0.0], [12.0])  # global norm 13
    total = apply_gradient_clipping([a, b], "norm", 6.5)
    assert float(total) == pytest.approx(13.0)
    assert torch.allclose(a.grad, torch.tensor([1.5, 2.0]))
    assert torch.allclose(b.grad, torch.tensor([6.0]))


def test_norm_clipping_leaves_gradients_under_the_threshold_alone():
    a = with_grad([0.0, 0.0], [3.0, 4.0])
    apply_gradient_clipping([a], "norm", 5.0 + 1e-3)
    assert torch.equal(a.grad, torch.tensor([3.0, 4.0]))


def test_value_clipping_clamps_each_entry():
    a = with_grad([0.0, 0.0, 0.0, 0.0], [-3.0, 0.5, 2.0, -0.25])
    assert apply_gradient_clipping([a], "value", 1.0) is None
    assert torch.equal(a.grad, torch.tensor([-1.0, 0.5, 1.0, -0.25]))


def test_adaptive_clipping_rescales_only_units_over_the_bound():
    # rows: ||W_0|| = 5, ||G_0|| = 0.5 (ratio 0.1, under 0.2); ||W_1|| = 1, ||G_1|| = 2 (over)
    w = with_grad([[3.0, 4.0], [0.0, 1.0]], [[0.3, 0.4], [0.0, 2.0]])
    # a zero bias: its bound is c * eps = 0.2 * 1e-3, and the vector is one unit
    bias = with_grad([0.0, 0.0], [0.3, 0.4])
    adaptive_clip_grad_([w, bias], clipping_threshold=0.2)
    assert torch.equal(w.grad[0], torch.tensor([0.3, 0.4]))  # untouched, exactly
    assert torch.allclose(w.grad[1], torch.tensor([0.0, 0.2]))  # 0.2 * 1 / 2 * [0, 2]
    assert torch.allclose(bias.grad, torch.tensor([0.3, 0.4]) * (0.2e-3 / 0.5))


def test_adaptive_clipping_of_a_conv_weight_uses_one_norm_per_filter():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 2, 3, 3))
    grad = torch.randn(3, 2, 3, 3)
    grad[1] *= 100  # filter 1 far over the bound
    weight.grad = grad.clone()
    adaptive_clip_grad_([weight], clipping_threshold=0.5)
    for unit in range(3):
        w_norm, g_norm = weight[unit].norm().item(), grad[unit].norm().item()
        expected = grad[unit] * min(1.0, 0.5 * w_norm / g_norm)
        assert torch.allclose(weight.grad[unit], expected, rtol=1e-5, atol=1e-6)
    assert weight.grad[1].norm().item() == pytest.approx(0.5 * weight[1].norm().item(), rel=1e-5)
    assert unitwise_norm(grad).shape == (3, 1, 1, 1)


def test_parameters_without_gradients_are_skipped():
    a, frozen = with_grad([0.0], [10.0]), nn.Parameter(torch.ones(2))
    for kind in ("norm", "value", "adaptive"):
        apply_gradient_clipping([a, frozen], kind, 1.0)
    assert frozen.grad is None
    assert apply_gradient_clipping([frozen], "norm", 1.0) is None


def test_default_thresholds_per_mode():
    assert GradientClipping().clipping_threshold == 1.0
    assert GradientClipping("value").clipping_threshold == DEFAULT_THRESHOLDS["value"]
    assert GradientClipping("adaptive").clipping_threshold == 0.01
    assert GradientClipping("adaptive", 0.1).clipping_threshold == 0.1


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"clipping_type": "l1"}, r"gradient_clipping.clipping_type must be one of norm"),
        ({"clipping_threshold": 0.0}, r"gradient_clipping.clipping_threshold must be > 0, got 0"),
        ({"clipping_threshold": -1.0}, r"clipping_threshold must be > 0, got -1"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        GradientClipping(**kwargs)
    with pytest.raises(ValueError, match=needle.split(".")[-1].split(" ")[0]):
        apply_gradient_clipping([], **kwargs)


# -- declaration ------------------------------------------------------------------------------


def test_declaration():
    decl = GradientClipping().declare()
    assert set(decl.events) == {Event.AFTER_TRAIN_BATCH}
    access = decl.events[Event.AFTER_TRAIN_BATCH]
    assert access.reads == {"model.grads"} and access.writes == {"model.grads"}
    assert GradientClipping("adaptive").declare().events[Event.AFTER_TRAIN_BATCH].reads == {
        "model.grads",
        "model.weights",
    }
    assert decl.runs_after == {"sam"} and decl.model_kinds is None and decl.data_kinds is None


def test_another_grad_writer_without_order_is_a_plan_conflict():
    from speedup.algorithm import Access

    masker = stand_in("grad_masker", {Event.AFTER_TRAIN_BATCH: Access(writes={"model.grads"})})
    algorithms = [GradientClipping(), masker]
    plan = plan_of(algorithms)
    assert [c.kind for c in plan.conflicts] == ["write-write"]


# -- in a run ---------------------------------------------------------------------------------


class GradNorms(Callback):
    """Global gradient norm before clipping (AFTER_BACKWARD) and after it (AFTER_TRAIN_BATCH:
    callbacks run after the algorithms)."""

    def __init__(self):
        self.before, self.after, self.largest = [], [], []

    @staticmethod
    def norm(state):
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))

    def after_backward(self, state, logger):
        self.before.append(self.norm(state))

    def after_train_batch(self, state, logger):
        self.after.append(self.norm(state))
        self.largest.append(max(float(p.grad.abs().max()) for p in state.model.parameters()))


@pytest.mark.parametrize("clipping_type", ["norm", "value", "adaptive"])
def test_smoke_20_steps_clip_every_step(clipping_type):
    train_loader, _ = loaders(make_blobs(n=64), batch_size=8)
    norms = GradNorms()
    clipping = GradientClipping(clipping_type, 1e-3)
    trainer = algorithm_trainer(tiny_model(), train_loader, clipping, callbacks=[norms], lr=0.1)
    trainer.fit()
    assert len(norms.after) == 20
    assert math.isfinite(float(trainer.state.train_metrics["loss"]))
    assert all(after < before for before, after in zip(norms.before, norms.after))
    if clipping_type == "norm":
        assert max(norms.after) == pytest.approx(1e-3, rel=1e-4)
    if clipping_type == "value":
        assert max(norms.largest) == pytest.approx(1e-3)


def test_exclude_leaves_named_parameters_unclipped():
    train_loader, _ = loaders(make_blobs(n=64), batch_size=8)
    seen = {}

    class Peek(Callback):
        def after_backward(self, state, logger):
            seen["before"] = state.model.net[2].weight.grad.clone()

        def after_train_batch(self, state, logger):
            seen["after"] = state.model.net[2].weight.grad.clone()
            seen["first_after"] = state.model.net[0].weight.grad.abs().max().item()

    trainer = Trainer(
        tiny_model(),
        train_loader,
        "2ba",
        algorithms=[GradientClipping("value", 1e-4, exclude=["net.2.*"])],
        callbacks=[Peek()],
    )
    trainer.fit()
    assert torch.equal(seen["before"], seen["after"])
    assert seen["first_after"] <= 1e-4
