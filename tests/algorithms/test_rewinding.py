import pytest
import torch
from conftest import loaders, make_blobs
from speedup.algorithms.magnitude_pruning import MagnitudePruning
from speedup.algorithms.rewinding import Rewinding
from torch import nn

from speedup.callback import Callback
from speedup.config import ConfigError, load_config
from speedup.engine import build_plan
from speedup.models import Classifier
from speedup.run import plan_config
from speedup.trainer import Trainer


def model():
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)), 4)


class Snap(Callback):
    """Copies the weights at chosen batch counts; callbacks run after the algorithms at an
    event, so this sees the weights the algorithms left."""

    def __init__(self, at):
        self.at, self.weights = set(at), {}

    def fit_start(self, state, logger):
        if 0 in self.at:
            self.weights[0] = {k: v.clone() for k, v in state.model.state_dict().items()}

    def batch_end(self, state, logger):
        if state.timestamp.batch in self.at:
            self.weights[state.timestamp.batch] = {
                k: v.clone() for k, v in state.model.state_dict().items()
            }


@pytest.mark.parametrize("to", [0, 5])
def test_weight_rewind_restores_survivors_bit_for_bit(to):
    pruning = MagnitudePruning(sparsity=0.7, at="20ba", scope="layerwise")
    rewinding = Rewinding(mode="weights", to=f"{to}ba")
    snap = Snap(at=[to, 20])
    train, _ = loaders(make_blobs(n=64), batch_size=8)
    Trainer(
        model(),
        train,
        "25ba",
        algorithms=[pruning, rewinding],
        callbacks=[snap],
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
    ).fit()
    before, after = snap.weights[to], snap.weights[20]
    for name, mask in pruning.masks.items():
        assert torch.equal(after[name][mask], before[name][mask])  # survivors: the snapshot
        assert torch.all(after[name][~mask] == 0)  # pruned: zero
    assert torch.equal(after["net.0.bias"], before["net.0.bias"])  # unpruned tensors rewind too


class LRTap(Callback):
    def __init__(self):
        self.lrs = []

    def before_train_batch(self, state, logger):
        self.lrs.append(state.optimizer.param_groups[0]["lr"])


def run_lrs(algorithms, steps=40):
    tap = LRTap()
    train, _ = loaders(make_blobs(n=64), batch_size=8)
    Trainer(
        model(),
        train,
        f"{steps}ba",
        algorithms=algorithms,
        callbacks=[tap],
        optimizer={"name": "sgd", "lr": 1.0},
        scheduler={"name": "cosine", "warmup": "4ba"},
    ).fit()
    return tap.lrs


def test_lr_rewinding_replays_the_schedule_from_the_rewind_point():
    baseline = run_lrs([])
    rewound = run_lrs([MagnitudePruning(sparsity=0.5, at="25ba"), Rewinding(mode="lr", to="2ba")])
    assert rewound[:25] == baseline[:25]
    # after pruning at batch 25, step 25 + k uses the schedule's LR at step 2 + k
    for k in range(15):
        assert rewound[25 + k] == pytest.approx(baseline[2 + k], abs=1e-12)


def test_finetune_uses_a_constant_small_lr():
    lrs = run_lrs(
        [MagnitudePruning(sparsity=0.5, at="20ba"), Rewinding(mode="finetune", finetune_lr=0.003)]
    )
    assert lrs[20:] == [0.003] * 20


def test_rewind_point_after_pruning_is_a_plan_error():
    algorithms = [MagnitudePruning(at="100ba"), Rewinding(to="200ba")]
    plan = build_plan({a.name: a.declare() for a in algorithms}, algorithms=algorithms)
    assert [c.kind for c in plan.conflicts] == ["invalid"]
    assert "to=200ba is later than magnitude_pruning's first pruning at 100ba" in str(
        plan.conflicts[0]
    )
    plan, _ = plan_config(load_config("quickstart", ["algorithms.rewinding={}"]))
    assert "rewinding: needs a pruning algorithm" in str(plan.conflicts[0])


def test_bad_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="rewinding.mode must be one of weights, lr, finetune"):
        load_config("quickstart", ["algorithms.rewinding.mode=rewind"])


def test_rewind_after_pruning_in_other_units_fails_at_fit_start():
    train, _ = loaders(make_blobs(n=64), batch_size=8)  # 8 batches per epoch
    algorithms = [MagnitudePruning(at="10ba"), Rewinding(to="2ep")]
    trainer = Trainer(model(), train, "30ba", algorithms=algorithms)  # plan: units differ
    with pytest.raises(ConfigError, match="to=2ep is later than magnitude_pruning's first"):
        trainer.fit()
