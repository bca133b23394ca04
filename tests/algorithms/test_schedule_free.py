"""Schedule-free AdamW/SGD: evaluation and checkpoints at x (checked against the package's own
``eval()``), bit-exact resume, and refusal of the LR schedules it replaces."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import schedulefree
import torch
from conftest import bad_overrides_test, loaders, make_blobs, tiny_model
from speedup.algorithms.schedule_free import ScheduleFree, schedule_free_optimizer

from speedup.callback import Callback
from speedup.checkpoint import CheckpointSaver, list_checkpoints
from speedup.config import ConfigError
from speedup.trainer import Trainer

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

pytestmark = pytest.mark.usefixtures("one_thread")


class _EvalWeights(Callback):
    """The weights every evaluation sees, by the batch count it happens at."""

    def __init__(self) -> None:
        self.seen: dict[int, list[torch.Tensor]] = {}

    def eval_before_forward(self, state: State, logger: Logger) -> None:
        batch = state.timestamp.batch
        if batch not in self.seen:
            self.seen[batch] = [p.detach().clone() for p in state.model.parameters()]


class _PackageModes(Callback):
    """The package's README recipe by hand: train() before training, eval() around evals."""

    def fit_start(self, state: State, logger: Logger) -> None:
        state.optimizer.train()

    def eval_start(self, state: State, logger: Logger) -> None:
        state.optimizer.eval()

    def eval_end(self, state: State, logger: Logger) -> None:
        state.optimizer.train()


def _trainer(algorithms=(), callbacks=(), optimizer=None, steps: int = 10, **kwargs) -> Trainer:
    train, evaluation = loaders(make_blobs(n=64), batch_size=8)
    kwargs.setdefault("eval_interval", "5ba")
    return Trainer(
        tiny_model(),
        train,
        f"{steps}ba",
        eval_dataloader=evaluation,
        optimizer=optimizer or {"name": "sgd", "lr": 0.1},
        algorithms=list(algorithms),
        callbacks=list(callbacks),
        device="cpu",
        **kwargs,
    )


def _weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.state.model.parameters()]


def test_eval_and_checkpoints_see_x_and_a_resume_is_bit_exact(tmp_path) -> None:
    seen = _EvalWeights()
    saver = CheckpointSaver(tmp_path, "5ba", keep_last=0, save_final=False, handle_signals=False)
    algorithm = ScheduleFree(lr=0.01, warmup="2ba")
    ours = _trainer([algorithm], [seen, saver])
    ours.fit()
    reference_seen = _EvalWeights()
    reference = _trainer(
        callbacks=[_PackageModes(), reference_seen],
        optimizer=lambda params: schedulefree.AdamWScheduleFree(params, lr=0.01, warmup_steps=2),
    )
    reference.fit()
    # At the first evaluation both ran the same five steps: x to the last bit.
    assert sorted(seen.seen) == sorted(reference_seen.seen) == [5, 10]
    for a, b in zip(seen.seen[5], reference_seen.seen[5], strict=True):
        assert torch.equal(a, b)
    # Later the package's eval()/train() round trip rounds y (ours restores it exactly).
    for a, b in zip(seen.seen[10], reference_seen.seen[10], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(seen.seen[5], seen.seen[10]))
    # The run ends at x (the model exported after fit), the optimizer in eval mode.
    assert algorithm.at_x and all(
        torch.equal(a, b) for a, b in zip(_weights(ours), seen.seen[10], strict=True)
    )
    # The mid-run checkpoint holds x: the weights the evaluation at step 5 saw.
    (middle,) = [p for p in list_checkpoints(tmp_path) if p.name.endswith("-ba5")]
    saved = torch.load(middle / "model.pt", weights_only=True)
    names = [n for n, _ in ours.state.model.named_parameters()]
    for name, x in zip(names, seen.seen[5], strict=True):
        assert torch.equal(saved[name], x)
    # Resumed with a fresh instance, no saver and no evaluation in between: bit-exact.
    resumed = _trainer([ScheduleFree(lr=0.01, warmup="2ba")])
    resumed.load_checkpoint(middle)
    resumed.fit()
    for a, b in zip(_weights(resumed), _weights(ours), strict=True):
        assert torch.equal(a, b)
    z_ours = [ours.state.optimizer.state[p]["z"] for p in ours.state.model.parameters()]
    z_resumed = [resumed.state.optimizer.state[p]["z"] for p in resumed.state.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(z_ours, z_resumed, strict=True))


def test_evaluating_and_checkpointing_leave_training_unchanged(tmp_path) -> None:
    busy = _trainer(
        [ScheduleFree(optimizer="sgd", lr=0.5)],
        [CheckpointSaver(tmp_path, "1ba", keep_last=1, handle_signals=False)],
        eval_interval="2ba",
    )
    busy.fit()
    quiet = _trainer([ScheduleFree(optimizer="sgd", lr=0.5)], eval_interval="0ba")
    quiet.fit()
    for a, b in zip(_weights(busy), _weights(quiet), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "scheduler",
    [{"name": "cosine"}, {"name": "wsd"}, {"name": "constant", "warmup": "2ba"}],
)
def test_a_learning_rate_schedule_is_refused_before_training(scheduler: dict) -> None:
    trainer = _trainer([ScheduleFree()], scheduler=scheduler)
    with pytest.raises(ConfigError, match="scheduler.name must be constant"):
        trainer.fit()
    assert trainer.state.timestamp.batch == 0


def test_the_functional_twin_builds_the_packages_optimizers() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    adamw = schedule_free_optimizer(params, "adamw", beta=0.95)
    assert isinstance(adamw, schedulefree.AdamWScheduleFree)
    assert adamw.param_groups[0]["betas"] == (0.95, 0.999) and adamw.param_groups[0]["lr"] == 0.0025
    sgd = schedule_free_optimizer(params, "sgd")
    assert isinstance(sgd, schedulefree.SGDScheduleFree)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["lr"] == 1.0


test_bad_schedule_free_arguments_fail_before_training = bad_overrides_test(
    [
        ("algorithms.schedule_free.optimizer=adam", "schedule_free.optimizer: unknown 'adam'"),
        ("algorithms.schedule_free.beta=1.0", "schedule_free.beta: in (0, 1)"),
        ("algorithms.schedule_free.warmup=5sec", "schedule_free.warmup"),
    ],
    base=["scheduler.name=constant"],
)
