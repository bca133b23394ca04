"""Test-time augmentation: airbench's weighted views, Hiverge's selective mode, plain metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn.functional as F
from conftest import bad_arguments_test
from speedup.algorithms.test_time_augmentation import (
    TestTimeAugmentation,
    low_confidence,
    selective_tta_logits,
    tta_logits,
    tta_views,
)
from torch import nn

from speedup.config import ConfigError, load_config
from speedup.data import TensorBatchLoader
from speedup.loggers import LoggerDestination
from speedup.models import Classifier
from speedup.trainer import Trainer

if TYPE_CHECKING:
    from speedup.state import State

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 5, 6, generator=torch.Generator().manual_seed(seed))


def _reflect(i: int, size: int) -> int:
    """Index ``i`` reflected into ``[0, size)`` without repeating the edge (numpy 'reflect')."""
    return -i if i < 0 else 2 * (size - 1) - i if i >= size else i


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., r, c] = x[..., reflect(r + dy), reflect(c + dx)], written pixel by pixel."""
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    for r in range(h):
        for c in range(w):
            out[..., r, c] = x[..., _reflect(r + dy, h), _reflect(c + dx, w)]
    return out


def _mirror(x: torch.Tensor) -> torch.Tensor:
    return x[..., list(range(x.shape[-1] - 1, -1, -1))]


class Linear(nn.Module):
    """A fixed linear map of the flattened image: logits that differ for every view."""

    def __init__(self, shape: tuple[int, ...], classes: int = 4, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(classes, int(torch.tensor(shape).prod()), generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def test_views_are_the_mirror_and_the_one_pixel_reflect_translations():
    x = _images()
    views = tta_views(x, level=2)
    # Crop (0, 0) of the 1-padded image shows pixel (r - 1, c - 1), crop (2, 2) (r + 1, c + 1).
    t1, t2 = _shifted(x, -1, -1), _shifted(x, 1, 1)
    expected = [x, _mirror(x), t1, _mirror(t1), t2, _mirror(t2)]
    assert len(views) == 6
    for got, want in zip(views, expected):
        assert torch.equal(got, want)
    assert [torch.equal(a, b) for a, b in zip(tta_views(x, level=1), expected[:2])] == [True, True]


def test_averaged_logits_equal_the_hand_computed_airbench_weights():
    x = _images()
    f = Linear(x.shape[1:])
    t1, t2 = _shifted(x, -1, -1), _shifted(x, 1, 1)
    level2 = (
        0.25 * f(x)
        + 0.25 * f(_mirror(x))
        + 0.125 * (f(t1) + f(_mirror(t1)) + f(t2) + f(_mirror(t2)))
    )
    assert torch.allclose(tta_logits(f, x, level=2), level2, atol=1e-5)
    assert torch.allclose(tta_logits(f, x, level=1), 0.5 * f(x) + 0.5 * f(_mirror(x)), atol=1e-5)
    # The plain logits, when given, stand in for the first view.
    plain = torch.full((x.shape[0], 4), 3.0)
    assert torch.allclose(
        tta_logits(f, x, level=1, plain=plain), 0.5 * plain + 0.5 * f(_mirror(x)), atol=1e-5
    )


def test_selective_mode_touches_exactly_the_planted_low_confidence_rows():
    x = _images(8)
    f = Linear(x.shape[1:])
    logits = torch.tensor([[9.0, 0.0, 0.0, 0.0]] * 8)
    logits[3] = torch.tensor([0.2, 0.1, 0.0, 0.0])  # least confident
    logits[6] = torch.tensor([1.0, 0.5, 0.0, 0.0])  # next
    logits[1] = torch.tensor([4.0, 0.0, 0.0, 0.0])  # third: outside the lowest 25%
    out, chosen = selective_tta_logits(f, x, logits, fraction=0.25, level=2)
    assert chosen.tolist() == [3, 6]
    t1, t2 = _shifted(x, -1, -1), _shifted(x, 1, 1)
    views = [_mirror(x), t1, _mirror(t1), t2, _mirror(t2)]
    uniform = (logits + sum(f(v) for v in views)) / 6  # Hiverge: the plain mean of six views
    for i in range(8):
        if i in (3, 6):
            assert torch.allclose(out[i], uniform[i], atol=1e-5)
        else:
            assert torch.equal(out[i], logits[i])
    assert low_confidence(logits, 0.5).tolist() == [3, 6, 1, 0]  # floor(0.5 * 8), ties by index
    assert low_confidence(logits, 0.1).numel() == 0  # floor(0.8) = 0


# -- in a run ---------------------------------------------------------------------------------


class Records(LoggerDestination):
    def __init__(self) -> None:
        self.records: list[dict] = []

    def log_metrics(self, metrics: dict[str, float], state: State) -> None:
        self.records.append(dict(metrics))


def _data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 3
    inputs = torch.randn(n, 3, 6, 6, generator=g)
    inputs[:, 0, :, :3] += targets.view(n, 1, 1) * 0.8  # a left-side signal: mirrors matter
    return {"inputs": inputs, "targets": targets}


def _fit(algorithms, eval_batch: int = 12) -> tuple[Trainer, Records]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    records = Records()
    trainer = Trainer(
        Classifier(net, 3, kind="cnn"),
        TensorBatchLoader(_data(48, 0), 8, shuffle=True, drop_last=True, seed=0),
        "12ba",
        eval_dataloader=TensorBatchLoader(_data(24, 1), eval_batch),
        algorithms=algorithms,
        loggers=[records],
        optimizer={"name": "sgd", "lr": 0.1},
        device="cpu",
        data_kind="image",
        eval_interval="6ba",
        log_interval="0ba",
    )
    trainer.fit()
    return trainer, records


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(1) == targets).float().mean())


def test_eval_reports_tta_and_plain_metrics_and_its_cost():
    plain_run, _ = _fit([])
    trainer, records = _fit([TestTimeAugmentation(level=2)])
    metrics = trainer.state.eval_metrics
    # TTA only changes evaluation: the plain metrics are the run without it.
    assert metrics["accuracy_plain"] == pytest.approx(plain_run.state.eval_metrics["accuracy"])
    assert metrics["loss_plain"] == pytest.approx(plain_run.state.eval_metrics["loss"])
    # The TTA accuracy is the accuracy of the airbench-weighted logits of the final model.
    data = _data(24, 1)
    net = trainer.state.model.net.eval()
    with torch.no_grad():
        x = data["inputs"]
        t1, t2 = _shifted(x, -1, -1), _shifted(x, 1, 1)
        views = [x, _mirror(x), t1, _mirror(t1), t2, _mirror(t2)]
        weights = [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
        logits = sum(w * net(v) for w, v in zip(weights, views))
    assert metrics["accuracy"] == pytest.approx(_accuracy(logits, data["targets"]))
    assert metrics["loss"] == pytest.approx(
        float(F.cross_entropy(logits, data["targets"])), rel=1e-5
    )
    tta = [r for r in records.records if "tta/seconds" in r]
    assert len(tta) == 2  # one per evaluation (at 6 and 12 batches)
    assert all(r["tta/augmented_images"] == 24 and r["tta/seconds"] >= 0 for r in tta)
    # The record holds every eval metric, so the last eval record is the final state.
    assert {k.removeprefix("eval/") for k in tta[-1] if k.startswith("eval/")} == set(metrics)


def test_selective_mode_augments_a_quarter_of_each_eval_batch():
    tta = TestTimeAugmentation(uncertain_fraction=0.25)
    trainer, records = _fit([tta], eval_batch=12)
    assert tta.last_selected is not None and tta.last_selected.numel() == 3  # floor(0.25 * 12)
    counts = [r["tta/augmented_images"] for r in records.records if "tta/seconds" in r]
    assert counts == [6, 6]  # two eval batches of 12, three images each
    assert "accuracy_plain" in trainer.state.eval_metrics


def test_outputs_that_are_not_class_logits_are_refused():
    class Dense(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x  # [N, C, H, W]: a dense prediction

    trainer = Trainer(
        Classifier(nn.Sequential(nn.Conv2d(3, 3, 1), Dense()), 3, kind="cnn"),
        TensorBatchLoader(_data(8, 0), 8),
        "1ba",
        eval_dataloader=TensorBatchLoader(_data(8, 1), 8),
        algorithms=[TestTimeAugmentation()],
        device="cpu",
        data_kind="image",
    )
    with pytest.raises(ConfigError, match=r"test_time_augmentation: needs \[N, classes\] logits"):
        trainer.eval()


test_bad_arguments_name_the_key = bad_arguments_test(
    TestTimeAugmentation,
    [
        ({"level": 3}, "test_time_augmentation.level must be one of 1, 2"),
        ({"level": 0}, "test_time_augmentation.level"),
        (
            {"uncertain_fraction": 0.0},
            r"test_time_augmentation.uncertain_fraction must be in \(0, 1\]",
        ),
        ({"uncertain_fraction": 1.5}, "test_time_augmentation.uncertain_fraction"),
    ],
)


def test_bad_values_in_a_recipe_are_config_errors():
    with pytest.raises(ConfigError, match="algorithms.test_time_augmentation.*level"):
        load_config("shapes2d-baseline", ["algorithms.test_time_augmentation.level=5"])
