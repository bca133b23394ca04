import math

import pytest
import torch
from conftest import (
    SaveAt,
    bad_arguments_test,
    load_optimizer_and_time,
    make_blobs,
    plan_of,
    snapshot,
    through_torch_save,
)
from speedup.algorithms.ema import EMA
from speedup.algorithms.magnitude_pruning import MagnitudePruning
from speedup.algorithms.swa import SWA, average_weights, swa_lr_factor, update_bn
from torch import nn
from torch.optim import swa_utils

from speedup.callback import Callback
from speedup.config import ConfigError
from speedup.data import TensorBatchLoader
from speedup.event import Event
from speedup.models import Classifier
from speedup.trainer import Trainer

SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}


def bn_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    return Classifier(net, 4)


def loader():
    return TensorBatchLoader(make_blobs(n=64), 8, shuffle=True, drop_last=True, seed=0)  # 8/ep


def train(swa, duration="20ba", callbacks=(), model=None, **kwargs):
    trainer = Trainer(
        model or bn_model(),
        loader(),
        duration,
        algorithms=[swa] if swa else [],
        callbacks=list(callbacks),
        optimizer=kwargs.pop("optimizer", SGD),
        **kwargs,
    )
    trainer.fit()
    return trainer


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# -- the math ---------------------------------------------------------------------------------


def test_average_weights_equals_averaged_model_on_the_same_sequence():
    model = bn_model()
    reference = swa_utils.AveragedModel(model)
    average, n = {}, 0
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        reference.update_parameters(model)
        n = average_weights(average, model, n)
    assert n == 6 == int(reference.n_averaged)
    for name, value in reference.module.named_parameters():
        torch.testing.assert_close(average[name], value, rtol=1e-6, atol=1e-6)


def test_average_weights_is_the_arithmetic_mean():
    w = nn.Parameter(torch.zeros(3))
    average, n = {}, 0
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            w.fill_(value)
        n = average_weights(average, {"w": w}, n)
    torch.testing.assert_close(average["w"], torch.full((3,), 3.0))


def test_swa_lr_factor_shapes():
    assert swa_lr_factor(0.0) == 0.0 and swa_lr_factor(1.0) == 1.0
    assert swa_lr_factor(0.5) == pytest.approx(0.5)
    assert swa_lr_factor(0.25) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert swa_lr_factor(0.25, "linear") == 0.25 and swa_lr_factor(3.0, "linear") == 1.0
    with pytest.raises(ValueError, match="strategy must be one of cos, linear"):
        swa_lr_factor(0.5, "step")


def test_update_bn_matches_torch_and_restores_momentum_and_mode():
    model, twin = bn_model(), bn_model()
    data = make_blobs(n=64)
    batches = [{k: v[i : i + 16] for k, v in data.items()} for i in range(0, 64, 16)]
    model.eval()
    assert update_bn(model, batches) == 4
    swa_utils.update_bn([b["inputs"] for b in batches], twin.net)
    torch.testing.assert_close(model.net[1].running_mean, twin.net[1].running_mean)
    torch.testing.assert_close(model.net[1].running_var, twin.net[1].running_var)
    assert model.net[1].momentum == 0.1 and not model.training
    assert update_bn(model, batches, max_batches=2) == 2
    assert update_bn(nn.Linear(2, 2), [torch.zeros(1, 2)]) == 0  # nothing to recompute


# -- in a run: side by side with AveragedModel -------------------------------------------------


class Reference(Callback):
    """Drives torch's AveragedModel on the same trajectory: callbacks run after algorithms at
    BATCH_END, so both see the weights after the same optimizer steps."""

    def __init__(self, updates):
        self.updates, self.averaged, self.last_training = set(updates), None, None

    def fit_start(self, state, logger):
        self.averaged = swa_utils.AveragedModel(state.model)

    def batch_end(self, state, logger):
        if state.timestamp.batch in self.updates:
            self.averaged.update_parameters(state.model)


def test_the_final_model_is_averaged_models_average_with_recomputed_batchnorm():
    swa = SWA(swa_start="10ba", update_interval="3ba")  # updates at 10, 13, 16, 19
    reference = Reference([10, 13, 16, 19])

    class LastTraining(Callback):
        def after_train_batch(self, state, logger):
            self.weights = params(state.model)

    last = LastTraining()
    trainer = train(swa, "20ba", [reference, last])
    model = trainer.state.model
    assert swa.num_averaged == 4 == int(reference.averaged.n_averaged) and swa.finished
    for name, value in reference.averaged.module.named_parameters():
        torch.testing.assert_close(
            dict(model.named_parameters())[name], value, rtol=1e-6, atol=1e-7
        )
    # the model ends on the average, not on its last training weights
    assert not torch.equal(params(model)["net.0.weight"], last.weights["net.0.weight"])
    # BatchNorm statistics: recomputed over one pass of the training data, as torch does
    twin = reference.averaged.module
    data = loader()
    data.set_epoch(2)  # the epoch the run ended in: the same batches (variances depend on them)
    batches = [b["inputs"] for b in data]
    swa_utils.update_bn(batches, twin.net)
    torch.testing.assert_close(model.net[1].running_mean, twin.net[1].running_mean)
    torch.testing.assert_close(model.net[1].running_var, twin.net[1].running_var)
    assert math.isfinite(float(trainer.state.train_metrics["loss"]))


def test_defaults_average_once_per_epoch_from_seven_tenths_and_finish_in_epoch_units():
    counts = {}

    class Count(Callback):
        def __init__(self, swa):
            self.swa = swa

        def batch_end(self, state, logger):
            counts[state.timestamp.batch] = self.swa.num_averaged

    swa = SWA()
    trainer = train(swa, "10ep", [Count(swa)])  # 80 batches; start 56; epochs end at 8k
    assert [b for b in range(1, 81) if counts[b] != counts.get(b - 1, 0)] == [56, 64, 72, 80]
    assert swa.finished and swa.num_averaged == 4
    assert trainer.state.timestamp.epoch == 10


def test_evaluation_sees_the_average_only_at_the_end():
    eval_loader = TensorBatchLoader(make_blobs(n=32, seed=1), 32)
    seen = []

    class AtEval(Callback):
        def eval_start(self, state, logger):
            seen.append((state.timestamp.batch, params(state.model)["net.0.weight"]))

    swa = SWA(swa_start="8ba", update_interval="2ba")
    trainer = train(swa, "12ba", [AtEval()], eval_dataloader=eval_loader, eval_interval="6ba")
    assert [b for b, _ in seen] == [6, 12]
    assert torch.equal(seen[-1][1], params(trainer.state.model)["net.0.weight"])


def test_swa_lr_anneals_from_the_current_lr_then_stays_constant():
    lrs = {}

    class Lr(Callback):
        def before_forward(self, state, logger):
            lrs[state.timestamp.batch] = state.optimizer.param_groups[0]["lr"]

    swa = SWA(swa_start="10ba", update_interval="1ba", swa_lr=0.02, anneal_steps="4ba")
    train(swa, "20ba", [Lr()], optimizer={"name": "sgd", "lr": 0.1})
    for batch in range(10):
        assert lrs[batch] == pytest.approx(0.1)
    for batch in range(10, 20):
        alpha = (1 - math.cos(math.pi * min(1.0, (batch - 10) / 4))) / 2
        assert lrs[batch] == pytest.approx(0.02 * alpha + 0.1 * (1 - alpha)), batch
    assert lrs[14] == pytest.approx(0.02) and lrs[19] == pytest.approx(0.02)
    assert swa.anneal_from == [pytest.approx(0.1)]


def test_pruned_weights_stay_zero_in_the_average():
    pruning = MagnitudePruning(sparsity=0.5, at="12ba")
    swa = SWA(swa_start="10ba", update_interval="1ba")
    trainer = Trainer(bn_model(), loader(), "20ba", algorithms=[pruning, swa], optimizer=SGD)
    trainer.fit()
    final = dict(trainer.state.model.named_parameters())
    for name, mask in pruning.masks.items():
        assert torch.all(final[name][~mask] == 0)
        assert torch.any(final[name][mask] != 0)


def test_one_sample_at_the_last_batch_keeps_the_weights_and_recomputes_batchnorm():
    swa = SWA(swa_start="0.9dur", update_interval="1ba")
    plain = train(None, "5ba")
    short = train(swa, "5ba")  # start: ceil(4.5) = 5 -> one sample at the very end
    assert swa.num_averaged == 1
    for name, value in params(plain.state.model).items():
        assert torch.equal(value, params(short.state.model)[name])
    # the statistics are a full pass's plain mean now, not the training's running average
    plain_bn, short_bn = plain.state.model.net[1], short.state.model.net[1]
    assert not torch.allclose(plain_bn.running_mean, short_bn.running_mean)
    assert int(short_bn.num_batches_tracked) == 8  # one pass over 8 batches


# -- resume -----------------------------------------------------------------------------------


def test_resume_from_state_dict_is_exact():
    def make():
        return SWA(swa_start="10ba", update_interval="2ba", swa_lr=0.05, anneal_steps="6ba")

    swa = make()
    checkpoint = SaveAt(12, lambda state: snapshot(state, swa=swa))  # mid-average and -annealing
    full = train(swa, "20ba", [checkpoint])
    saved = checkpoint.saved
    assert saved["swa"]["num_averaged"] == 2 and not saved["swa"]["finished"]
    assert saved["swa"]["anneal_from"] == [pytest.approx(0.1)]
    resumed_swa = make()
    resumed_swa.load_state_dict(through_torch_save(saved["swa"]))
    model = bn_model(seed=5)
    model.load_state_dict(saved["model"])
    trainer = Trainer(model, loader(), "20ba", algorithms=[resumed_swa], optimizer=SGD)
    load_optimizer_and_time(trainer, saved)
    trainer.fit()
    assert resumed_swa.num_averaged == swa.num_averaged == 6  # 10, 12, ..., 20
    for name, value in full.state.model.state_dict().items():
        assert torch.equal(trainer.state.model.state_dict()[name], value), name


# -- arguments and declaration -----------------------------------------------------------------


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    SWA,
    [
        ({"swa_start": "1dur"}, r"swa.swa_start must be before the end \(< 1dur\)"),
        ({"swa_start": "soon"}, "swa.swa_start"),
        ({"update_interval": "0ba"}, "swa.update_interval must be > 0"),
        ({"update_interval": "3sec"}, "swa.update_interval.*wall-clock"),
        ({"swa_lr": -0.1}, r"swa.swa_lr must be >= 0 \(or None\), got -0.1"),
        ({"anneal_strategy": "step"}, "swa.anneal_strategy must be one of cos, linear"),
        ({"bn_batches": 0}, "swa.bn_batches must be >= 1"),
    ],
)


def test_a_start_after_the_end_fails_at_fit_start():
    with pytest.raises(ConfigError, match="algorithms.swa.swa_start: 30ba is after the end"):
        train(SWA(swa_start="30ba"), "20ba")


def test_declaration_and_incompatibility_with_ema():
    decl = SWA().declare()
    assert set(decl.events) == {Event.FIT_START, Event.BATCH_END}  # no LR writes by default
    assert decl.events[Event.BATCH_END].writes == {"model.weights"}
    assert {"masks", "dataloader"} <= decl.events[Event.BATCH_END].reads
    assert SWA(swa_lr=0.01).declare().events[Event.BEFORE_TRAIN_BATCH].writes == {"lr"}
    assert decl.incompatible_with == {"ema"}
    algorithms = [EMA(), SWA()]
    plan = plan_of(algorithms)
    assert [c.kind for c in plan.conflicts] == ["incompatible"]
    pruning = [MagnitudePruning(), SWA()]
    plan = plan_of(pruning)
    assert plan.conflicts == [] and plan.order[Event.BATCH_END] == ["magnitude_pruning", "swa"]
