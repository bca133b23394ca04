import pytest
import torch
import torch.nn.functional as F
from conftest import algorithm_trainer, loaders, make_blobs, tiny_model
from speedup.algorithms.label_smoothing import LabelSmoothing, smooth_labels

from speedup.callback import Callback
from speedup.data import TensorBatchLoader
from speedup.models.base import Model, soft_cross_entropy
from speedup.trainer import Trainer


def szegedy(indices, num_classes, alpha):
    """Szegedy et al. 2016, section 7: q'(k) = (1 - alpha) * delta(k, y) + alpha / K, written
    out element by element, the class axis at dim 1 (after the sample axis)."""
    flat = indices.reshape(indices.shape[0], -1)
    out = torch.empty(flat.shape[0], num_classes, flat.shape[1])
    for n in range(flat.shape[0]):
        for position in range(flat.shape[1]):
            for k in range(num_classes):
                delta = 1.0 if k == int(flat[n, position]) else 0.0
                out[n, k, position] = (1 - alpha) * delta + alpha / num_classes
    return out.reshape(indices.shape[0], num_classes, *indices.shape[1:])


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3])
def test_equals_torch_label_smoothing_on_hard_labels(alpha):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g)
    targets = torch.randint(0, 10, (64,), generator=g)
    ours = soft_cross_entropy(logits, smooth_labels(targets, 10, alpha))
    torch_value = F.cross_entropy(logits, targets, label_smoothing=alpha)
    assert abs(ours.item() - torch_value.item()) < 1e-6


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_class_indices_follow_the_paper(alpha):
    targets = torch.tensor([2, 0, 3, 3, 1])
    out = smooth_labels(targets, 4, alpha)
    assert out.shape == (5, 4)
    torch.testing.assert_close(out, szegedy(targets, 4, alpha))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_one_hot_targets_of_any_dtype_are_probabilities(dtype):
    # decided by shape, not dtype: integer one-hot [N, K] used to come back [N, K, K]
    indices = torch.tensor([1, 0, 2])
    one_hot = F.one_hot(indices, 3).to(dtype)
    out = smooth_labels(one_hot, 3, 0.3)
    assert out.shape == (3, 3)
    torch.testing.assert_close(out, szegedy(indices, 3, 0.3))


def test_segmentation_targets_come_back_class_first_like_the_logits():
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (2, 3, 4), generator=g)  # [N, H, W]
    out = smooth_labels(targets, 5, 0.2, logits_ndim=4)
    assert out.shape == (2, 5, 3, 4)  # [N, K, H, W]
    torch.testing.assert_close(out, szegedy(targets, 5, 0.2))
    # the same loss as torch's own label smoothing, whose class dim is 1
    logits = torch.randn(2, 5, 3, 4, generator=g)
    torch.testing.assert_close(
        F.cross_entropy(logits, out), F.cross_entropy(logits, targets, label_smoothing=0.2)
    )
    # dense probabilities [N, K, H, W] pass through as probabilities
    torch.testing.assert_close(smooth_labels(out, 5, 0.0, logits_ndim=4), out)


def test_alpha_one_gives_uniform_targets():
    out = smooth_labels(torch.tensor([0, 3]), 4, 1.0)
    torch.testing.assert_close(out, torch.full((2, 4), 0.25))
    assert LabelSmoothing(alpha=1.0).alpha == 1.0


@pytest.mark.parametrize(
    ("targets", "kwargs", "needle"),
    [
        (torch.zeros(4, 5), {}, r"targets of shape \(4, 5\) fit neither"),  # 5 columns, K = 4
        (torch.zeros(4, dtype=torch.long), {"logits_ndim": 4}, "for 4-dim logits"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), {}, "must be integers, got torch.float32"),
    ],
)
def test_targets_that_fit_neither_form_raise(targets, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        smooth_labels(targets, 4, 0.1, **kwargs)


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
    # integer multi-hot too, and one logit per sample ([N] targets for [N] logits)
    torch.testing.assert_close(
        smooth_labels(multi_hot.long(), 3, 0.1, binary=True), torch.tensor([[0.95, 0.05, 0.95]])
    )
    single = smooth_labels(torch.tensor([1.0, 0.0]), 1, 0.2, binary=True, logits_ndim=1)
    torch.testing.assert_close(single, torch.tensor([0.9, 0.1]))


@pytest.mark.parametrize("alpha", [-0.1, 1.01, True, "0.1"])
def test_rejects_alpha_outside_range(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        smooth_labels(torch.tensor([0]), 2, alpha)
    with pytest.raises(ValueError, match=r"label_smoothing.alpha must be a number in \[0, 1\]"):
        LabelSmoothing(alpha=alpha)


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
    trainer = algorithm_trainer(tiny_model(), train, LabelSmoothing(alpha=0.2), 1, [taps], lr=0.0)
    trainer.fit()
    batch = next(iter(train))
    expected = F.cross_entropy(trainer.state.model(batch), batch["targets"], label_smoothing=0.2)
    assert abs(taps.at_loss[0].item() - expected.item()) < 1e-6
    assert not taps.after[0].dtype.is_floating_point  # integer class ids again after the loss


class PixelClassifier(Model):
    """A 1x1 conv scoring K classes at every pixel: logits [N, K, H, W], targets [N, H, W]."""

    kind = "cnn"

    def __init__(self, classes=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, classes, 1)

    def forward(self, batch):
        return self.conv(batch["inputs"])

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs, batch["targets"])  # class dim 1: indices or probabilities


def test_in_a_run_segmentation_targets_are_smoothed_class_first():
    g = torch.Generator().manual_seed(0)
    data = {"inputs": torch.randn(8, 2, 4, 4, generator=g)}
    data["targets"] = torch.randint(0, 3, (8, 4, 4), generator=g)
    train = TensorBatchLoader(data, 8)
    taps = Taps()
    torch.manual_seed(0)
    model = PixelClassifier()
    trainer = Trainer(
        model,
        train,
        "1ba",
        algorithms=[LabelSmoothing(alpha=0.3)],
        callbacks=[taps],
        optimizer={"name": "sgd", "lr": 0.0},
        data_kind="image",
    )
    trainer.fit()
    expected = F.cross_entropy(model(data), data["targets"], label_smoothing=0.3)
    assert abs(taps.at_loss[0].item() - expected.item()) < 1e-6
    assert torch.equal(taps.after[0], data["targets"])  # restored after the loss
