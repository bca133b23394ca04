"""Lookahead (Zhang et al. 2019) and airbench's lookahead-EMA against the definitions written
out here, evaluation at the slow weights, masks, and bad arguments."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from conftest import bad_overrides_test, loaders, make_blobs
from speedup.algorithms.lookahead import Lookahead, ema_lookahead_decay, lookahead_sync
from torch import nn

from speedup.callback import Callback
from speedup.models import Classifier
from speedup.trainer import Trainer

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_synchronisation_by_hand() -> None:
    slow = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    fast = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([-4.0])}
    lookahead_sync(slow, fast, alpha=0.5)
    assert slow["w"].tolist() == [2.0, 4.0] and slow["b"].tolist() == [-2.0]
    assert fast["w"].tolist() == [2.0, 4.0] and fast["b"].tolist() == [-2.0]
    lookahead_sync(slow, {"w": torch.tensor([6.0, 4.0]), "b": torch.tensor([2.0])}, alpha=0.25)
    assert slow["w"].tolist() == [3.0, 4.0] and slow["b"].tolist() == [-1.0]


def test_the_ema_decay_follows_airbench() -> None:
    assert ema_lookahead_decay(0, 100) == 0.0
    assert ema_lookahead_decay(50, 100) == pytest.approx(0.95**5 * 0.125)
    assert ema_lookahead_decay(100, 100) == pytest.approx(0.7737809375)  # 0.95**5
    assert ema_lookahead_decay(40, 80, k=3) == pytest.approx(0.95**3 / 8)


class _Reference(Callback):
    """The definitions, applied after each optimizer step of a plain run (no algorithm).

    ``standard``: Zhang et al.'s Algorithm 1 - slow weights phi start at the initial weights;
    after every k steps phi <- phi + alpha (theta - phi), theta <- phi; the run returns phi.
    ``ema``: airbench - every k steps, over floating parameters and buffers,
    ema <- d ema + (1 - d) live, live <- ema with d = 0.95**k (t/T)**3; at the end live <- ema.
    """

    def __init__(self, variant: str, total: int, k: int = 5, alpha: float = 0.5) -> None:
        self.variant, self.total, self.k, self.alpha = variant, total, k, alpha
        self.slow: dict[str, torch.Tensor] = {}

    def _tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        found = dict(model.named_parameters())
        if self.variant == "ema":
            found.update(model.named_buffers())
        return {n: t for n, t in found.items() if t.is_floating_point()}

    def fit_start(self, state: State, logger: Logger) -> None:
        self.slow = {n: t.detach().clone() for n, t in self._tensors(state.model).items()}

    @torch.no_grad()
    def batch_end(self, state: State, logger: Logger) -> None:
        t, live = state.timestamp.batch, self._tensors(state.model)
        if t % self.k == 0:
            for name, phi in self.slow.items():
                if self.variant == "ema":
                    d = 0.95**self.k * (t / self.total) ** 3
                    phi.copy_(d * phi + (1 - d) * live[name])
                else:
                    phi.add_(self.alpha * (live[name] - phi))
                live[name].copy_(phi)
        elif t == self.total:
            for name, phi in self.slow.items():
                live[name].copy_(phi)


def _bn_model() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    return Classifier(net, 4, kind="mlp")


def _fit(algorithms=(), callbacks=(), steps: int = 12, eval_interval: str = "0ba") -> Trainer:
    train, evaluation = loaders(make_blobs(n=64), batch_size=8)
    trainer = Trainer(
        _bn_model(),
        train,
        f"{steps}ba",
        eval_dataloader=evaluation,
        optimizer={"name": "sgd", "lr": 0.2, "momentum": 0.9},
        algorithms=list(algorithms),
        callbacks=list(callbacks),
        eval_interval=eval_interval,
        device="cpu",
    )
    trainer.fit()
    return trainer


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.state.model.state_dict().items()}


@pytest.mark.parametrize("variant", ["standard", "ema"])
def test_training_matches_the_definition(variant: str) -> None:
    # 12 steps, k = 5: synchronisations after 5 and 10; the run ends mid-cycle at 12.
    ours = _state(_fit([Lookahead(variant=variant)]))
    reference = _state(_fit(callbacks=[_Reference(variant, total=12)]))
    plain = _state(_fit())
    for name, value in ours.items():
        assert torch.allclose(value.float(), reference[name].float(), atol=1e-6), name
    assert not torch.allclose(ours["net.0.weight"], plain["net.0.weight"], atol=1e-4)
    # The reference averages BatchNorm's statistics only in the ema variant: matched above.


class _Peek(Callback):
    def __init__(self) -> None:
        self.at_eval: list[torch.Tensor] = []
        self.after_eval: list[torch.Tensor] = []
        self.before_eval: list[torch.Tensor] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.before_eval.append(state.model.net[0].weight.detach().clone())

    def eval_before_forward(self, state: State, logger: Logger) -> None:
        self.at_eval.append(state.model.net[0].weight.detach().clone())

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self.after_eval.append(state.model.net[0].weight.detach().clone())


def test_an_evaluation_between_synchronisations_sees_the_slow_weights() -> None:
    peek, algorithm = _Peek(), Lookahead()
    _fit([algorithm], [peek], steps=10, eval_interval="7ba")
    slow_at_5 = peek.before_eval[4]  # synchronised at 5: live == slow there
    assert torch.equal(peek.at_eval[0], slow_at_5)  # the evaluation at 7 saw phi
    assert not torch.equal(peek.before_eval[6], slow_at_5)
    assert torch.equal(peek.after_eval[6], peek.before_eval[6])  # fast weights restored


def test_pruned_entries_stay_zero_in_the_slow_weights() -> None:
    from speedup.algorithms.magnitude_pruning import MagnitudePruning

    trainer = _fit([MagnitudePruning(schedule="oneshot", at="3ba", sparsity=0.5), Lookahead()])
    mask = trainer.state.masks["net.0.weight"]
    lookahead = trainer.state.algorithms[1]
    assert (lookahead.slow["net.0.weight"][~mask] == 0).all()
    assert (trainer.state.model.net[0].weight[~mask] == 0).all()


test_bad_lookahead_arguments_fail_before_training = bad_overrides_test(
    [
        ("algorithms.lookahead.variant=nesterov", "lookahead.variant: unknown variant 'nesterov'"),
        ("algorithms.lookahead.k=0", "lookahead.k: the fast steps per synchronisation, >= 1"),
        ("algorithms.lookahead.alpha=1.5", "lookahead.alpha: a share in (0, 1]"),
    ],
)


def test_alpha_belongs_to_the_standard_variant_only() -> None:
    with pytest.raises(ValueError, match="alpha applies to variant standard only"):
        Lookahead(variant="ema", alpha=0.5)
