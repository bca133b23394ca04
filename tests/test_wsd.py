"""The warmup-stable-decay LR schedule (Hägele et al. 2024), checked at planted points against
the definition written out here, through the Trainer, the recipe validator and a resume."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
import torch
from conftest import bad_overrides_test, loaders, make_blobs, tiny_model

from speedup.callback import Callback
from speedup.config import ConfigError, load_config
from speedup.optim import schedule_factor
from speedup.state import State
from speedup.time import Time, TimeConverter
from speedup.trainer import Trainer

if TYPE_CHECKING:
    from speedup.loggers import Logger


def _factor(spec: dict, total: int = 100):
    """The schedule's multiplier as a function of the batch count, for a run of ``total``."""
    run = Time(total, "ba")
    state = State(model=torch.nn.Linear(1, 1), max_duration=run)
    state.converter = TimeConverter(batches_per_epoch=10, samples_per_batch=4, max_duration=run)
    return schedule_factor(spec, state).factor_at


def _reference(step: int, total: int, warmup: int, decay: float, shape: str, final: float):
    """Written from the paper: hold the peak, then cool down over the last ``decay`` share of
    all ``total`` steps; the project's warmup ramps (step + 1) / warmup over the first steps."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    start = total - decay * total
    if step < start:
        return warm
    p = (step - start) / (decay * total)
    left = 1 - p if shape == "linear" else 1 - math.sqrt(p)
    return warm * (final + (1 - final) * left)


@pytest.mark.parametrize("shape", ["linear", "sqrt"])
def test_wsd_matches_the_definition_at_planted_points(shape: str) -> None:
    factor = _factor({"name": "wsd", "decay": 0.2, "shape": shape, "final_factor": 0.1})
    # Stable until 80 of 100 steps, then the cooldown; at 90 half of it has passed.
    assert factor(0) == 1.0 and factor(79) == 1.0 and factor(80) == 1.0
    half = 0.5 if shape == "linear" else 1 - math.sqrt(0.5)
    assert factor(90) == pytest.approx(0.1 + 0.9 * half)
    assert factor(100) == pytest.approx(0.1)  # the end of the run: the final factor
    for step in range(101):
        assert factor(step) == pytest.approx(_reference(step, 100, 0, 0.2, shape, 0.1))


def test_wsd_sqrt_cooldown_stays_above_linear_and_both_fall_monotonically() -> None:
    linear = [_factor({"name": "wsd", "shape": "linear"})(s) for s in range(101)]
    sqrt = [_factor({"name": "wsd", "shape": "sqrt"})(s) for s in range(101)]
    assert all(a >= b for a, b in zip(linear, linear[1:]))
    assert all(a >= b for a, b in zip(sqrt, sqrt[1:]))
    # 1 - sqrt(p) <= 1 - p: the square-root cooldown drops faster at first, then flattens.
    assert all(s <= lin + 1e-12 for s, lin in zip(sqrt, linear))
    assert sqrt[85] < linear[85] and linear[-1] == sqrt[-1] == 0.0


def test_wsd_warmup_counts_in_the_whole_run() -> None:
    factor = _factor({"name": "wsd", "warmup": "10ba", "decay": 0.5, "shape": "linear"})
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    # The cooldown starts at 50 of 100 (not 50 of the 90 post-warmup steps).
    assert factor(49) == 1.0 and factor(75) == pytest.approx(0.5)
    for step in range(101):
        assert factor(step) == pytest.approx(_reference(step, 100, 10, 0.5, "linear", 0.0))
    # A warmup that runs into the cooldown multiplies it rather than jumping over it.
    overlap = _factor({"name": "wsd", "warmup": "60ba", "decay": 0.5, "shape": "linear"})
    assert overlap(59) == pytest.approx(1.0 * (1 - 9 / 50))


class _LRs(Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.lrs: list[float] = []
        self.stop_at = stop_at

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self.lrs.append(state.optimizer.param_groups[0]["lr"])

    def batch_end(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch == self.stop_at:
            state.stop_training("planted stop")


def _trainer(spec: dict, tap: _LRs, stop_at: int | None = None) -> Trainer:
    tap.stop_at = stop_at
    train, _ = loaders(make_blobs(n=32), batch_size=8)  # 4 batches per epoch
    return Trainer(
        tiny_model(),
        train,
        "5ep",
        optimizer={"name": "sgd", "lr": 0.5},
        scheduler=spec,
        callbacks=[tap],
        device="cpu",
    )


def test_wsd_drives_the_trainers_lr_and_survives_a_resume(tmp_path) -> None:
    spec = {"name": "wsd", "decay": 0.25, "shape": "sqrt", "final_factor": 0.0}
    whole = _LRs()
    _trainer(spec, whole).fit()
    assert len(whole.lrs) == 20
    expected = [0.5 * _reference(s, 20, 0, 0.25, "sqrt", 0.0) for s in range(20)]
    assert whole.lrs == pytest.approx(expected)
    assert whole.lrs[14] == 0.5 and whole.lrs[16] < 0.5  # the cooldown starts at 15
    # Stop after 12 steps (inside the stable phase), resume: the cooldown still starts at 15.
    first = _LRs()
    half = _trainer(spec, first, stop_at=12)
    half.fit()
    assert len(first.lrs) == 12
    path = half.save_checkpoint(tmp_path)
    rest = _LRs()
    resumed = _trainer(spec, rest)
    resumed.load_checkpoint(path)
    resumed.fit()
    assert first.lrs + rest.lrs == pytest.approx(whole.lrs)


test_wsd_bad_values_fail_before_training = bad_overrides_test(
    [
        ("scheduler.shape=cosine", "scheduler.shape: unknown cooldown shape 'cosine'; allowed"),
        ("scheduler.decay=1.5", "scheduler.decay: the cooldown's share of the run, in (0, 1]"),
        ("scheduler.decay=0", "scheduler.decay"),
        ("scheduler.final_factor=-0.1", "scheduler.final_factor"),
    ],
    base=["scheduler.name=wsd"],
)


def test_wsd_recipe_keys_validate() -> None:
    cfg = load_config("quickstart", ["scheduler.name=wsd", "scheduler.decay=0.3"])
    assert cfg.scheduler.decay == 0.3
    with pytest.raises(ConfigError, match="scheduler.cooldown: unknown key"):
        load_config("quickstart", ["scheduler.name=wsd", "scheduler.cooldown=0.3"])
