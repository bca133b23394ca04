"""The NaN/Inf guard: non-finite losses and gradients, GradScaler, microbatches, checkpoints."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from conftest import loaders, make_blobs, tiny_model

from speedup.callback import Callback
from speedup.checkpoint import list_checkpoints, read_checkpoint
from speedup.config import load_config
from speedup.guard import (
    NonFiniteGuard,
    NonFiniteLossError,
    gradients_norm_sum,
    nonfinite_tensors,
)
from speedup.run import build_trainer, run_config
from speedup.trainer import Trainer

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

pytestmark = pytest.mark.usefixtures("one_thread")

FLOAT32_MAX = torch.finfo(torch.float32).max


def reference_flagged(grads: list[torch.Tensor]) -> bool:
    """The paper-free definition the guard implements, in float64: some gradient holds NaN or
    inf, or some gradient's sum of squares exceeds the float32 range (its norm overflows)."""
    for g in grads:
        values = g.detach().double().reshape(-1).tolist()
        if not all(math.isfinite(v) for v in values):
            return True
        if sum(v * v for v in values) > FLOAT32_MAX:
            return True
    return False


def all_finite(tree) -> bool:
    """Every floating tensor in nested dicts/lists is finite (written independently of the
    guard's own walker)."""
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(all_finite(v) for v in tree)
    return True


def _optimizer_with_grads(*grads: torch.Tensor) -> torch.optim.Optimizer:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return torch.optim.SGD(params, lr=0.1)


def test_gradients_norm_sum_equals_sum_of_l2_norms() -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=g), torch.randn(7, generator=g) * 100, torch.randn(1)]
    expected = sum(math.sqrt(sum(v * v for v in t.double().reshape(-1).tolist())) for t in grads)
    got = gradients_norm_sum(_optimizer_with_grads(*grads))
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([1.0, float("nan")]),
        torch.tensor([float("inf"), 0.0]),
        torch.tensor([2e19, 1.0]),  # finite, but its square overflows float32 (Adam's v -> inf)
        torch.full((400,), 1e18),  # each square fits; their sum does not
    ],
)
def test_gradients_norm_sum_is_nonfinite_exactly_when_the_reference_flags(bad) -> None:
    fine = torch.ones(5)
    assert reference_flagged([fine, bad])
    assert not math.isfinite(float(gradients_norm_sum(_optimizer_with_grads(fine, bad))))
    assert not reference_flagged([fine, fine * 1e9])
    assert math.isfinite(float(gradients_norm_sum(_optimizer_with_grads(fine, fine * 1e9))))


def test_gradients_norm_sum_is_none_without_gradients() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    assert gradients_norm_sum(torch.optim.SGD([p], lr=0.1)) is None


def test_nonfinite_tensors_names_each_bad_entry() -> None:
    state = {
        "model": {"a.weight": torch.ones(2), "b.weight": torch.tensor([1.0, float("nan")])},
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg_sq": torch.tensor([float("inf")])}},
            "param_groups": [{"lr": float("inf"), "params": [0]}],  # plain floats: not tensors
        },
        "masks": {"a": torch.tensor([True, False])},
        "counts": [torch.tensor([1, 2]), torch.tensor([-float("inf")])],
    }
    assert nonfinite_tensors(state) == [
        "model.b.weight",
        "optimizer.state.0.exp_avg_sq",
        "counts.1",
    ]
    assert nonfinite_tensors({"model": {"w": torch.zeros(3)}}) == []


# -- in the Trainer ---------------------------------------------------------------------------


class PoisonGrad(Callback):
    """At step ``step``, after the backward of microbatch ``microbatch`` (0-based), puts
    ``value`` into one gradient entry; the loss stays finite."""

    def __init__(self, step: int, value: float, microbatch: int = 0) -> None:
        self.step, self.value, self.microbatch = step, value, microbatch
        self._seen = 0

    def batch_start(self, state: State, logger: Logger) -> None:
        self._seen = 0

    def after_backward(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch + 1 == self.step and self._seen == self.microbatch:
            grad = next(p.grad for p in state.model.parameters() if p.grad is not None)
            grad.view(-1)[0] = self.value
        self._seen += 1


class Snapshots(Callback):
    """Weights and Adam's first moments after every step."""

    def __init__(self) -> None:
        self.weights: dict[int, list[torch.Tensor]] = {}
        self.moments: dict[int, list[torch.Tensor]] = {}

    def batch_end(self, state: State, logger: Logger) -> None:
        step = state.timestamp.batch
        self.weights[step] = [p.detach().clone() for p in state.model.parameters()]
        self.moments[step] = [
            s["exp_avg"].clone() for s in state.optimizer.state.values() if "exp_avg" in s
        ]


def _trainer(callbacks, steps: int = 5, **kwargs) -> Trainer:
    train, _ = loaders(make_blobs(), batch_size=16)
    return Trainer(
        tiny_model(),
        train,
        f"{steps}ba",
        optimizer={"name": "adamw", "lr": 1e-2},
        callbacks=callbacks,
        device="cpu",
        log_interval="0ba",
        **kwargs,
    )


@pytest.mark.parametrize("microbatch_size", [None, 8])
def test_nonfinite_gradient_with_finite_loss_stops_before_the_step(microbatch_size) -> None:
    # With microbatches the poison goes into the first one's gradient only: the check must see
    # the accumulated gradient, not the last microbatch's.
    snaps = Snapshots()
    losses = []

    class Loss(Callback):
        def after_train_batch(self, state: State, logger: Logger) -> None:
            losses.append(float(state.train_metrics["loss"]))

    trainer = _trainer(
        [Loss(), PoisonGrad(3, float("nan")), NonFiniteGuard("stop"), snaps],
        microbatch_size=microbatch_size,
    )
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is nan .* at step 3 ") as err:
        trainer.fit()
    assert err.value.step == 3
    assert math.isfinite(losses[-1])  # the loss was fine: only the gradient caught it
    assert sorted(snaps.weights) == [1, 2]
    for before, now in zip(snaps.weights[2], trainer.state.model.parameters()):
        assert torch.equal(before, now.detach())  # the step was never taken


def test_skip_drops_a_step_with_a_nonfinite_gradient() -> None:
    snaps = Snapshots()
    guard = NonFiniteGuard("skip")
    trainer = _trainer([PoisonGrad(3, float("inf"), microbatch=1), guard, snaps], steps=4)
    trainer.microbatch_size = 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    messages = [str(w.message) for w in caught]
    assert any("gradient norm is inf" in m and "at step 3 " in m for m in messages)
    assert guard.skipped == 1
    for a, b in zip(snaps.weights[2], snaps.weights[3]):
        assert torch.equal(a, b)  # no update at step 3
    for a, b in zip(snaps.moments[2], snaps.moments[3]):
        assert torch.equal(a, b)  # nor any optimizer state change
    assert all(all(torch.isfinite(m).all() for m in ms) for ms in snaps.moments.values())
    assert any(not torch.equal(a, b) for a, b in zip(snaps.weights[3], snaps.weights[4]))


def test_with_a_grad_scaler_inf_gradients_are_left_to_the_scaler() -> None:
    # fp16 loss scaling skips overflowing steps and lowers the scale by design; the guard must
    # neither stop nor count them. (fp16 needs CUDA; a CPU GradScaler runs the same logic.)
    snaps = Snapshots()
    guard = NonFiniteGuard("stop")
    trainer = _trainer([PoisonGrad(2, float("inf")), guard, snaps], steps=3)
    scaler = trainer.state.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.fit()
    assert guard.skipped == 0
    for a, b in zip(snaps.weights[1], snaps.weights[2]):
        assert torch.equal(a, b)  # the scaler skipped step 2
    assert scaler.get_scale() == 512.0  # and halved the scale (backoff_factor 0.5)
    assert any(not torch.equal(a, b) for a, b in zip(snaps.weights[2], snaps.weights[3]))


def test_with_a_grad_scaler_a_nonfinite_loss_still_stops() -> None:
    class NanLoss(Callback):
        def after_loss(self, state: State, logger: Logger) -> None:
            if state.timestamp.batch + 1 == 2:
                state.loss = state.loss * float("nan")

    trainer = _trainer([NanLoss(), NonFiniteGuard("stop")], steps=3)
    trainer.state.scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(NonFiniteLossError, match="training loss is nan at step 2 "):
        trainer.fit()


# -- runs and checkpoints ---------------------------------------------------------------------

#: The issue's reproduction: the quickstart with AdamW at lr=1e6, a checkpoint every step.
HUGE_LR = [
    "optimizer.lr=1e6",
    "max_duration=12ba",
    "checkpoint.interval=1ba",
    "checkpoint.keep_last=0",
    "progress_bar=false",
    "threads=1",
    "log_interval=1ba",
]


def _first_flagged_step(cfg) -> int:
    """Replays the run with the guard in skip mode, recording each step's gradients after the
    last backward; returns the first step the reference definition flags."""
    flagged = []

    class Record(Callback):
        def after_backward(self, state: State, logger: Logger) -> None:
            grads = [p.grad for p in state.model.parameters() if p.grad is not None]
            loss = float(state.loss)
            if not math.isfinite(loss) or reference_flagged(grads):
                flagged.append(state.timestamp.batch + 1)

    cfg.nonfinite = "skip"
    trainer = build_trainer(cfg, extra_callbacks=[Record()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit()
    assert flagged, "the reproduction no longer diverges"
    return flagged[0]


def test_adamw_with_a_huge_lr_exits_1_naming_the_step_and_the_last_checkpoint(
    tmp_path: Path, capsys
) -> None:
    from speedup.cli import main

    run_dir = tmp_path / "run"
    expected = _first_flagged_step(load_config("quickstart", HUGE_LR, smoke=True))
    assert expected > 1  # so that a good checkpoint exists before it

    code = main(["run", "quickstart", "--smoke", *HUGE_LR, f"run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"at step {expected} " in err
    saved = list_checkpoints(run_dir / "checkpoints")  # one per step before it, none after
    assert saved and saved[-1].name.endswith(f"-ba{expected - 1}")
    assert f"The last good checkpoint is {saved[-1]}." in err
    for checkpoint in saved:
        _, parts = read_checkpoint(checkpoint)
        assert all_finite(parts["model"]), checkpoint
        assert all_finite(parts["optimizer"]), checkpoint


class PoisonOptimizerState(Callback):
    """After step ``step`` (past the guard), makes Adam's second moment inf: what a finite but
    overflowing update would leave behind."""

    def __init__(self, step: int) -> None:
        self.step = step

    def batch_end(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch == self.step:
            first = next(iter(state.optimizer.state.values()))
            first["exp_avg_sq"].view(-1)[0] = float("inf")


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_checkpoint_with_nonfinite_state_is_never_written(tmp_path: Path, mode: str) -> None:
    cfg = load_config(
        "quickstart",
        [
            "max_duration=6ba",
            "checkpoint.interval=2ba",
            "checkpoint.keep_last=0",
            "progress_bar=false",
            "threads=1",
            f"nonfinite={mode}",
            f"run_dir={tmp_path / 'run'}",
        ],
        smoke=True,
    )
    with pytest.raises(NonFiniteLossError) as err:
        run_config(cfg, extra_callbacks=[PoisonOptimizerState(3)])
    message = str(err.value)
    folder = tmp_path / "run" / "checkpoints"
    assert "refusing to write checkpoint" in message and "ep0-ba4 at step 4" in message
    assert "optimizer.state." in message and "exp_avg_sq" in message
    assert f"The last good checkpoint is {folder / 'ep0-ba2'}." in message
    assert err.value.step == 4
    assert [p.name for p in list_checkpoints(folder)] == ["ep0-ba2"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    _, parts = read_checkpoint(folder / "ep0-ba2")
    assert all_finite(parts["model"]) and all_finite(parts["optimizer"])


def test_guard_cost_is_reported_by_the_overhead_benchmark(capsys) -> None:
    from speedup.benchmarks import overhead

    results = overhead.main(["--repeats", "1", "--mlp-steps", "3", "--cnn-steps", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"cnn_guard_ratio={results['cnn_guard_ratio']:.4f}" in last
    assert f"mlp_guard_us={results['mlp_guard_us']:.4f}" in last
    assert results["cnn_guard_ratio"] > 0 and math.isfinite(results["mlp_guard_us"])
