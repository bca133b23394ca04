import math

import pytest
import torch
from conftest import algorithm_trainer, bad_arguments_test, loaders, make_blobs, plan_of
from speedup.algorithms.gradient_clipping import GradientClipping
from speedup.algorithms.label_smoothing import LabelSmoothing
from speedup.algorithms.sam import SAM, bn_stats_frozen, sam_gradient, sam_perturbation
from torch import nn

from speedup.callback import Callback
from speedup.data import TensorBatchLoader
from speedup.event import Event
from speedup.models import Classifier
from speedup.models.base import Model
from speedup.trainer import Trainer


class Quadratic(Model):
    """Least squares in w: loss = mean_i 0.5 * (x_i . w - y_i)^2, gradient X^T (X w - y) / N."""

    def __init__(self, w0):
        super().__init__()
        self.w = nn.Parameter(w0.clone())

    def forward(self, batch):
        return batch["x"] @ self.w

    def loss(self, outputs, batch):
        return 0.5 * ((outputs - batch["y"]) ** 2).mean()


def quadratic_data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 3, generator=g, dtype=torch.float64),
        "y": torch.randn(n, generator=g, dtype=torch.float64),
    }


def grad(w, x, y):
    return x.T @ (x @ w - y) / len(y)


def closed_form_step(w, x, y, lr, rho, adaptive=False):
    g = grad(w, x, y)
    if adaptive:
        e = rho * w * w * g / (w.abs() * g).norm()
    else:
        e = rho * g / g.norm()
    return w - lr * grad(w + e, x, y)


W0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
LR = 0.1


def run_quadratic(sam, steps, microbatch_size=None):
    data = quadratic_data()
    loader = TensorBatchLoader(data, 8)  # one batch per epoch: the same batch every step
    model = Quadratic(W0)
    trajectory = []

    class Track(Callback):
        def batch_end(self, state, logger):
            trajectory.append(state.model.w.detach().clone())

    trainer = Trainer(
        model,
        loader,
        f"{steps}ba",
        algorithms=[sam] if sam else [],
        callbacks=[Track()],
        optimizer={"name": "sgd", "lr": LR},
        microbatch_size=microbatch_size,
    )
    trainer.fit()
    return data, trajectory


# -- the math ---------------------------------------------------------------------------------


@pytest.mark.parametrize("microbatch_size", [None, 2, 3])
@pytest.mark.parametrize("adaptive", [False, True])
def test_update_on_a_quadratic_equals_the_closed_form(adaptive, microbatch_size):
    sam = SAM(rho=0.3, adaptive=adaptive)
    data, trajectory = run_quadratic(sam, 3, microbatch_size)
    w = W0.clone()
    for step in range(3):
        w = closed_form_step(w, data["x"], data["y"], LR, 0.3, adaptive)
        torch.testing.assert_close(trajectory[step], w, rtol=1e-12, atol=1e-12)
    plain = W0 - LR * grad(W0, data["x"], data["y"])
    assert not torch.allclose(trajectory[0], plain)  # SAM's step is not the plain one


def test_interval_alternates_sam_and_plain_steps():
    sam = SAM(rho=0.3, interval=2)
    data, trajectory = run_quadratic(sam, 4)
    x, y, w = data["x"], data["y"], W0.clone()
    for step in range(4):
        if step % 2 == 0:
            w = closed_form_step(w, x, y, LR, 0.3)
        else:
            w = w - LR * grad(w, x, y)
        torch.testing.assert_close(trajectory[step], w, rtol=1e-12, atol=1e-12)
    assert sam.steps_applied == 2


def test_sam_perturbation_has_norm_rho_and_the_gradients_direction():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    no_grad = nn.Parameter(torch.ones(3))
    e = sam_perturbation([a, no_grad, b], rho=0.5)
    assert len(e) == 2
    torch.testing.assert_close(e[0], torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(e[1], torch.tensor([0.4]))
    assert torch.equal(a.grad, torch.tensor([3.0, 0.0]))  # not modified without out=


def test_sam_gradient_restores_the_weights_bit_exactly():
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(7, 5), torch.randn(7, 3)
    nn.functional.mse_loss(net(x), y).backward()
    seen = {}

    def closure():
        seen["weight"] = net.weight.detach().clone()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        return loss

    sam_gradient(net.parameters(), closure, rho=0.1)
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name])  # bit-exact, not w + e - e
    assert not torch.equal(seen["weight"], before["weight"])  # the closure saw w + e
    assert net.weight.grad is not None


def test_bn_stats_frozen_keeps_running_statistics_and_counters():
    bn = nn.BatchNorm1d(4, momentum=None)
    bn(torch.randn(8, 4))
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked
    count = count.clone()
    with bn_stats_frozen(bn):
        bn(torch.randn(8, 4) + 5)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, count) and bn.momentum is None
    bn(torch.randn(8, 4) + 5)  # outside: statistics update again
    assert not torch.equal(bn.running_mean, mean)


def bn_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    return Classifier(net, 4)


def test_second_pass_leaves_batchnorm_statistics_as_the_first_pass_left_them():
    stats = {}
    for name, algorithms in (("plain", []), ("sam", [SAM(rho=0.5)])):
        train_loader, _ = loaders(make_blobs(n=64), batch_size=8)
        model = bn_model()
        Trainer(model, train_loader, "1ba", algorithms=algorithms).fit()
        bn = model.net[1]
        stats[name] = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked)
    for plain, sam in zip(stats["plain"], stats["sam"]):
        assert torch.equal(plain, sam)


# -- arguments and declaration -----------------------------------------------------------------


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    SAM,
    [
        ({"rho": 0.0}, "sam.rho must be > 0, got 0"),
        ({"rho": -1}, "sam.rho must be > 0, got -1"),
        ({"epsilon": 0.0}, "sam.epsilon must be > 0"),
        ({"interval": 0}, "sam.interval must be an integer >= 1, got 0"),
        ({"interval": 1.5}, "sam.interval must be an integer >= 1, got 1.5"),
    ],
)


def test_declaration_orders_sam_before_clipping_and_after_target_rewrites():
    decl = SAM().declare()
    access = decl.events[Event.AFTER_TRAIN_BATCH]
    assert access.writes == {"model.grads"} and "model.grads" in access.reads
    assert decl.events[Event.BEFORE_LOSS].writes == frozenset()
    assert decl.runs_before == {"gradient_clipping"}
    assert {"label_smoothing", "mixup", "cutmix"} <= decl.runs_after
    assert decl.model_kinds is None and decl.data_kinds is None
    algorithms = [GradientClipping(), LabelSmoothing(), SAM()]
    plan = plan_of(algorithms)
    assert plan.conflicts == []
    assert plan.order[Event.AFTER_TRAIN_BATCH] == ["sam", "gradient_clipping"]
    assert plan.order[Event.BEFORE_LOSS] == ["label_smoothing", "sam"]


def test_the_second_pass_sees_smoothed_targets():
    seen = []

    class Spy(Classifier):
        def loss(self, outputs, batch):
            seen.append(batch["targets"].dtype.is_floating_point)
            return super().loss(outputs, batch)

    torch.manual_seed(0)
    model = Spy(nn.Sequential(nn.Linear(8, 4)), 4)
    train_loader, _ = loaders(make_blobs(n=64), batch_size=8)
    Trainer(model, train_loader, "1ba", algorithms=[SAM(), LabelSmoothing(0.1)]).fit()
    assert seen == [True, True]  # first pass and SAM's pass both on smoothed targets


# -- in a run ---------------------------------------------------------------------------------


def test_smoke_20_steps_changes_the_gradient_on_sam_steps_only():
    class Grads(Callback):
        def __init__(self):
            self.first, self.final = [], []

        def after_backward(self, state, logger):
            self.first.append(state.model.net[0].weight.grad.clone())

        def after_train_batch(self, state, logger):
            self.final.append(state.model.net[0].weight.grad.clone())

    train_loader, _ = loaders(make_blobs(n=64), batch_size=8)
    grads = Grads()
    sam = SAM(rho=0.05, interval=2)
    momentum = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    trainer = algorithm_trainer(
        bn_model(), train_loader, sam, callbacks=[grads], optimizer=momentum
    )
    trainer.fit()
    assert math.isfinite(float(trainer.state.train_metrics["loss"]))
    assert sam.steps_applied == 10
    changed = [not torch.equal(a, b) for a, b in zip(grads.first, grads.final)]
    assert changed == [step % 2 == 0 for step in range(20)]


def test_fp16_grad_scaler_is_refused():
    from speedup.config import ConfigError

    class FakeState:
        scaler = object()

    with pytest.raises(ConfigError, match="algorithms.sam: fp16"):
        SAM().apply(Event.FIT_START, FakeState(), None)
