import pytest
import torch
from conftest import algorithm_trainer, loaders, make_blobs, smoke_run
from speedup.algorithms.magnitude_pruning import (
    MagnitudePruning,
    dense_state_dict,
    magnitude_masks,
    measured_sparsity,
    prunable_parameters,
    to_semi_structured,
)
from torch import nn

from speedup.callback import Callback
from speedup.config import ConfigError, load_config
from speedup.models import Classifier
from speedup.trainer import Trainer


def model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    return Classifier(net, 4)


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    ],
)
def test_masked_weights_stay_exactly_zero_for_100_steps(optimizer):
    class CheckEveryStep(Callback):
        def __init__(self, algorithm):
            self.algorithm, self.checked = algorithm, 0

        def batch_end(self, state, logger):
            for name, mask in self.algorithm.masks.items():
                weight = dict(state.model.named_parameters())[name]
                assert torch.all(weight[~mask] == 0)
                self.checked += 1

    pruning = MagnitudePruning(sparsity=0.8, at="10ba", scope="layerwise")
    check = CheckEveryStep(pruning)
    train, _ = loaders(make_blobs(n=64), batch_size=8)
    net = model()
    Trainer(net, train, "110ba", optimizer=optimizer, algorithms=[pruning], callbacks=[check]).fit()
    assert check.checked == 101 * 3  # 3 layers, checked at the pruning step and 100 after it
    for weight in prunable_parameters(net).values():
        assert int((weight == 0).sum()) == round(0.8 * weight.numel())


def test_measured_sparsity_within_one_weight_per_layer():
    weights = {"a": torch.randn(7, 13), "b": torch.randn(5, 3, 3, 3), "c": torch.randn(11)}
    masks = magnitude_masks(weights, 0.37, scope="layerwise")
    for name, w in weights.items():
        pruned = int((~masks[name]).sum())
        assert abs(pruned - 0.37 * w.numel()) <= 1
    masks = magnitude_masks(weights, 0.37, scope="global")
    total = sum(w.numel() for w in weights.values())
    assert abs(sum(int((~m).sum()) for m in masks.values()) - 0.37 * total) <= 1


def test_global_and_layerwise_choose_different_masks_on_a_planted_example():
    big = torch.full((10,), 10.0)  # a layer of large weights
    small = torch.arange(1.0, 11.0) / 100  # a layer of small weights
    weights = {"big": big, "small": small}
    layerwise = magnitude_masks(weights, 0.5, scope="layerwise")
    global_ = magnitude_masks(weights, 0.5, scope="global")
    assert int(layerwise["big"].sum()) == 5 and int(layerwise["small"].sum()) == 5
    assert torch.equal(layerwise["small"], small > 0.055)  # the 5 largest of the small layer
    assert bool(global_["big"].all()) and not bool(global_["small"].any())


def test_two_four_masks_keep_exactly_two_of_every_four():
    g = torch.Generator().manual_seed(0)
    weights = {"fc": torch.randn(16, 32, generator=g), "conv": torch.randn(8, 4, 3, 3, generator=g)}
    masks = magnitude_masks(weights, 0.0, structure="2:4")
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert torch.all(groups.sum(-1) == 2)
        kept = weights[name].abs().reshape(mask.shape[0], -1, 4)
        smallest_kept = torch.where(groups, kept, torch.inf).min(-1).values
        largest_pruned = torch.where(~groups, kept, -torch.inf).max(-1).values
        assert torch.all(smallest_kept >= largest_pruned)


def test_n_m_needs_m_to_divide_the_dimension():
    with pytest.raises(ValueError, match="not divisible by M=4"):
        magnitude_masks({"w": torch.randn(4, 6)}, 0.0, structure="2:4")
    with pytest.raises(ValueError, match="N:M"):
        MagnitudePruning(structure="4:2")


def test_gradual_schedule_reaches_target_exactly_at_end():
    class Track(Callback):
        def __init__(self):
            self.sparsity = {}

        def batch_end(self, state, logger):
            weights = prunable_parameters(state.model)
            self.sparsity[state.timestamp.batch] = measured_sparsity(weights)["global"]

    pruning = MagnitudePruning(
        sparsity=0.9, schedule="gradual", start="10ba", end="37ba", every="5ba"
    )
    track = Track()
    train, _ = loaders(make_blobs(n=64), batch_size=8)
    algorithm_trainer(model(), train, pruning, 50, [track]).fit()
    s = track.sparsity
    assert s[9] == s[10] == 0.0  # the cubic starts at initial_sparsity (0) at start
    assert 0 < s[15] < s[20] < s[35] < 0.9
    assert s[36] == s[35]  # between pruning steps nothing changes
    assert s[37] == pytest.approx(0.9, abs=1 / 700) and s[50] == s[37]
    assert pruning.target_sparsity(10) == 0.0
    assert pruning.target_sparsity(23.5) == pytest.approx(0.9 * (1 - 0.5**3))


def test_state_dict_round_trip_restores_masks():
    pruning = MagnitudePruning(sparsity=0.5, at="2ba")
    train, _ = loaders(make_blobs(n=32), batch_size=8)
    Trainer(model(), train, "4ba", algorithms=[pruning]).fit()
    saved = pruning.state_dict()
    restored = MagnitudePruning(sparsity=0.5, at="2ba")
    restored.load_state_dict(saved)
    assert restored.masks.keys() == pruning.masks.keys()
    assert all(torch.equal(restored.masks[k], pruning.masks[k]) for k in saved["masks"])
    # resumed into a fresh model, the masks apply at fit start
    fresh = model(seed=1)
    Trainer(fresh, train, "1ba", algorithms=[restored]).fit()
    for name, weight in prunable_parameters(fresh).items():
        assert torch.all(weight[~pruning.masks[name]] == 0)


def test_dense_export_and_semi_structured_needs_cuda():
    pruning = MagnitudePruning(sparsity=0.5, at="1ba", structure="2:4")
    train, _ = loaders(make_blobs(n=32), batch_size=8)
    net = model()
    Trainer(net, train, "2ba", algorithms=[pruning]).fit()
    dense = dense_state_dict(net, pruning.masks)
    assert all(isinstance(v, torch.Tensor) and not v.is_sparse for v in dense.values())
    assert float((dense["net.0.weight"] == 0).float().mean()) == 0.5
    with pytest.raises(RuntimeError, match="CUDA"):
        to_semi_structured(net, pruning.masks)


def test_include_and_exclude_patterns():
    names = set(prunable_parameters(model(), exclude=["net.4.*"]))
    assert names == {"net.0.weight", "net.2.weight"}
    assert set(prunable_parameters(model(), include=["net.2.*"])) == {"net.2.weight"}


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_outside_unit_interval_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"magnitude_pruning.*sparsity must be in \[0, 1\)"):
        load_config("quickstart", [f"algorithms.magnitude_pruning.sparsity={value}"])


def test_n_m_not_dividing_a_layer_fails_before_training_with_exit_2(capsys, tmp_path):
    # MNIST-1D's first conv has 1 input channel x kernel 5 = 5 inputs per output: not 4-divisible
    code = smoke_run(tmp_path, "algorithms.magnitude_pruning.structure='2:4'")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "not divisible by M=4" in err and "exclude" in err
    assert not (tmp_path / "summary.json").exists()
