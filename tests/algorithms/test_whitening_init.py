"""Whitening init (airbench): eigen-filters of image patches as [W, -W], frozen; bias phase."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn.functional as F
from conftest import bad_arguments_test
from speedup.algorithms.whitening_init import (
    WhiteningInit,
    init_whitening,
    patch_covariance,
    whitening_filters,
)
from torch import nn

from speedup.callback import Callback
from speedup.checkpoint import CheckpointSaver, list_checkpoints
from speedup.config import ConfigError, load_config
from speedup.data import TensorBatchLoader
from speedup.engine import build_plan
from speedup.models import Classifier
from speedup.trainer import Trainer

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 40, size: int = 10, seed: int = 0) -> torch.Tensor:
    """Images with correlated channels and neighbouring pixels, as natural images have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size + 2, size + 2, generator=g)
    x = F.avg_pool2d(x, 3, stride=1)  # spatial correlation
    mix = torch.tensor([[1.0, 0.6, 0.3], [0.2, 1.0, 0.5], [0.4, 0.1, 1.0]])
    return torch.einsum("dc,nchw->ndhw", mix, x) + 0.1  # colour correlation, a small mean


def _second_moment_by_loops(images: torch.Tensor, k: int) -> torch.Tensor:
    """mean(p p^T) over every stride-1 k x k patch, the patches cut out one position at a time."""
    n, c, h, w = images.shape
    rows = [
        images[:, :, i : i + k, j : j + k].reshape(n, c * k * k)
        for i in range(h - k + 1)
        for j in range(w - k + 1)
    ]
    patches = torch.cat(rows).double()
    return patches.T @ patches / patches.shape[0]


@pytest.mark.parametrize("k", [2, 3])
def test_patch_covariance_is_the_mean_outer_product_of_all_patches(k):
    images = _images()
    covariance, count = patch_covariance(images, k)
    assert count == 40 * (10 - k + 1) ** 2
    assert torch.allclose(covariance, _second_moment_by_loops(images, k), atol=1e-6)


def test_whitened_patches_have_identity_covariance():
    images = _images()
    moment = _second_moment_by_loops(images, 2)
    filters = whitening_filters(moment, 3, 2, eps=0.0)
    assert filters.shape == (24, 3, 2, 2)  # airbench's 2 * 3 * 2 * 2 channels
    positive, negative = filters[:12], filters[12:]
    assert torch.equal(negative, -positive)
    # The responses of the positive half to every patch: unit, uncorrelated second moments.
    out = F.conv2d(images.double(), positive)  # no padding: one response per 2x2 patch
    responses = out.permute(0, 2, 3, 1).reshape(-1, 12)
    assert torch.allclose(
        responses.T @ responses / responses.shape[0], torch.eye(12).double(), atol=1e-6
    )
    # With eps, component i is scaled to lambda_i / (lambda_i + eps) instead of 1.
    eps = 5e-4
    w = whitening_filters(moment, 3, 2, eps=eps)[:12].reshape(12, 12)
    eigenvalues = torch.linalg.eigvalsh(moment).flip(0)  # largest first, as the filters are
    expected = torch.diag(eigenvalues / (eigenvalues + eps))
    assert torch.allclose(w @ moment @ w.T, expected, atol=1e-6)


def test_fewer_channels_keep_the_components_of_largest_variance():
    images = _images()
    moment = _second_moment_by_loops(images, 3)  # 27 components
    eigenvalues = torch.linalg.eigvalsh(moment).flip(0)
    conv = nn.Conv2d(3, 9, 3, padding=1, bias=False)  # room for 4 pairs and one left over
    before = conv.weight.detach().clone()
    assert init_whitening(conv, images.float(), eps=0.0) == 4
    w = conv.weight.detach()[:4].reshape(4, 27).double()
    assert torch.allclose(w @ moment @ w.T, torch.eye(4).double(), atol=1e-5)
    # Each filter's direction is an eigenvector of the four largest eigenvalues.
    directions = w / w.norm(dim=1, keepdim=True)
    rayleigh = torch.einsum("id,de,ie->i", directions, moment, directions)
    assert torch.allclose(rayleigh, eigenvalues[:4], rtol=1e-4)
    assert torch.equal(conv.weight[4:8], -conv.weight[:4])
    assert torch.equal(conv.weight[8], before[8])  # beyond the pairs: untouched
    assert conv.weight.requires_grad is False


# -- in a run ---------------------------------------------------------------------------------


def _data(seed: int = 0, n: int = 32) -> dict[str, torch.Tensor]:
    targets = torch.arange(n) % 4
    inputs = _images(n, 8, seed)
    inputs[:, 0] += targets.view(n, 1, 1) * 0.3
    return {"inputs": inputs, "targets": targets}


def _model() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 24, 2),  # airbench's whitening layer: 2x2, 3 -> 24, no padding, a bias
        nn.GELU(),
        nn.Conv2d(24, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    return Classifier(net, 4, kind="cnn")


class Biases(Callback):
    def __init__(self) -> None:
        self.biases: list[torch.Tensor] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.biases.append(state.model.net[0].bias.detach().clone())


def _trainer(algorithm, data, steps=8, callbacks=()) -> Trainer:
    return Trainer(
        _model(),
        TensorBatchLoader(data, 8, shuffle=True, drop_last=True, seed=0),
        f"{steps}ba",
        algorithms=[algorithm],
        callbacks=list(callbacks),
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
        device="cpu",
        data_kind="image",
        log_interval="0ba",
    )


def test_the_weight_is_whitened_frozen_and_the_bias_trains_only_for_its_phase():
    data = _data()
    biases = Biases()
    whitening = WhiteningInit(num_images=16, bias_phase="3ba")
    trainer = _trainer(whitening, data, steps=8, callbacks=[biases])
    conv = trainer.state.model.net[0]
    held = {id(p) for group in trainer.state.optimizer.param_groups for p in group["params"]}
    assert id(conv.weight) not in held and id(conv.bias) in held  # frozen before the optimizer
    trainer.fit()
    # The filters of the first 16 training images, computed here from their patches.
    expected = whitening_filters(
        _second_moment_by_loops(data["inputs"][:16], 2), 3, 2, eps=5e-4
    ).float()
    assert torch.allclose(conv.weight, expected, atol=1e-5)  # 8 steps of SGD left it unchanged
    # The bias moved in each of the first three steps and never after.
    initial = _model().net[0].bias
    assert not torch.equal(biases.biases[0], initial)
    assert not torch.equal(biases.biases[1], biases.biases[0])
    assert not torch.equal(biases.biases[2], biases.biases[1])
    assert all(torch.equal(b, biases.biases[2]) for b in biases.biases[3:])
    assert whitening.bias_frozen and conv.bias.requires_grad is False


def test_a_resumed_run_loads_the_saved_filters_and_never_recomputes(tmp_path):
    saver = CheckpointSaver(tmp_path, "4ba", keep_last=0, save_final=False, handle_signals=False)
    full = _trainer(WhiteningInit(num_images=16, bias_phase="2ba"), _data(0), 8, [saver])
    full.fit()
    (checkpoint,) = [p for p in list_checkpoints(tmp_path) if p.name.endswith("-ba4")]
    # Resumed over other images: recomputing would give other filters.
    resumed = _trainer(WhiteningInit(num_images=16, bias_phase="2ba"), _data(seed=5), 8)
    logged = []
    resumed.logger.log_metrics = lambda metrics: logged.append(dict(metrics))  # type: ignore
    resumed.load_checkpoint(checkpoint)
    resumed.fit()
    conv, original = resumed.state.model.net[0], full.state.model.net[0]
    assert torch.equal(conv.weight, original.weight)
    assert not any("whitening_init/seconds" in m for m in logged)
    assert conv.bias.requires_grad is False  # the phase ended before the checkpoint
    assert torch.equal(conv.bias, original.bias)


def test_a_missing_layer_fails_before_training_naming_the_convs():
    with pytest.raises(ConfigError, match=r"whitening_init.layer: 'stem' is not a Conv2d.*net\.0"):
        _trainer(WhiteningInit(layer="stem", bias_phase=None), _data())


def test_a_conv_without_room_for_two_filters_is_refused_at_init():
    with pytest.raises(ValueError, match="no room for"):
        init_whitening(nn.Conv2d(3, 1, 2), _images())


def test_declared_incompatible_with_weight_standardization():
    from speedup.algorithms.weight_standardization import WeightStandardization

    declarations = {
        "whitening_init": WhiteningInit().declare(),
        "weight_standardization": WeightStandardization().declare(),
    }
    plan = build_plan(declarations, "cnn", "image")
    assert [str(c) for c in plan.conflicts] == [
        "whitening_init and weight_standardization are declared incompatible"
    ]


test_bad_arguments_name_the_key = bad_arguments_test(
    WhiteningInit,
    [
        ({"num_images": 0}, "whitening_init.num_images must be an integer >= 1"),
        ({"eps": -1.0}, "whitening_init.eps must be a number >= 0"),
        ({"bias_phase": "3sec"}, "whitening_init.bias_phase"),
        ({"bias_phase": "soon"}, "whitening_init.bias_phase"),
    ],
)


def test_bad_values_in_a_recipe_are_config_errors():
    with pytest.raises(ConfigError, match="algorithms.whitening_init.*num_images"):
        load_config("shapes2d-baseline", ["algorithms.whitening_init.num_images=0"])
