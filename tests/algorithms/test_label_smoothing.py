import pytest
import torch
import torch.nn.functional as F
from conftest import loaders, make_blobs, tiny_model
from speedup.algorithms.label_smoothing import LabelSmoothing, smooth_labels

from speedup.callback import Callback
from speedup.models.base import soft_cross_entropy
from speedup.trainer import Trainer


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3])
def test_equals_torch_label_smoothing_on_hard_labels(alpha):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g)
    targets = torch.randint(0, 10, (64,), generator=g)
    ours = soft_cross_entropy(logits, smooth_labels(targets, 10, alpha))
    torch_value = F.cross_entropy(logits, targets, label_smoothing=alpha)
    assert abs(ours.item() - torch_value.item()) < 1e-6


def test_soft_labels_are_smoothed_as_probabilities():
    soft = torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    out = smooth_labels(soft, 4, alpha=0.2)
    torch.testing.assert_close(out, torch.tensor([[0.61, 0.29, 0.05, 0.05]]))
    assert torch.allclose(out.sum(-1), torch.tensor(1.0))


def test_binary_targets_move_towards_one_half():
    multi_hot = torch.tensor([[1.0, 0.0, 1.0]])
    torch.testing.assert_close(
        smooth_labels(multi_hot, 3, 0.1, binary=True), torch.tensor([[0.95, 0.05, 0.95]])
    )


def test_rejects_alpha_outside_range():
    with pytest.raises(ValueError, match="alpha"):
        smooth_labels(torch.tensor([0]), 2, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LabelSmoothing(alpha=-0.1)


class Taps(Callback):
    def __init__(self):
        self.at_loss, self.after = [], []

    def before_backward(self, state, logger):
        self.at_loss.append(state.loss.detach())

    def after_backward(self, state, logger):
        self.after.append(state.batch["targets"])


def test_in_a_run_the_loss_is_smoothed_and_targets_restored():
    train, _ = loaders(make_blobs(n=32), batch_size=16)
    taps = Taps()
    trainer = Trainer(
        tiny_model(),
        train,
        "1ba",
        algorithms=[LabelSmoothing(alpha=0.2)],
        callbacks=[taps],
        optimizer={"name": "sgd", "lr": 0.0},
    )
    trainer.fit()
    batch = next(iter(train))
    expected = F.cross_entropy(trainer.state.model(batch), batch["targets"], label_smoothing=0.2)
    assert abs(taps.at_loss[0].item() - expected.item()) < 1e-6
    assert not taps.after[0].dtype.is_floating_point  # integer class ids again after the loss
