"""Shared fixtures: tiny in-memory data and models that train in milliseconds."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from speedup.callback import Callback
from speedup.data import TensorBatchLoader
from speedup.models import Classifier
from speedup.models.nets import SmallCNN2d
from speedup.models.vision import CifarResNet
from speedup.trainer import Trainer

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

# Generated datasets are cached on disk; keep the tests' cache out of the user's home.
os.environ.setdefault("SPEEDUP_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))


def make_blobs(n: int = 128, features: int = 8, classes: int = 4, seed: int = 0) -> dict:
    """Linearly separable-ish Gaussian blobs."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g) * 3
    targets = torch.arange(n) % classes
    inputs = centers[targets] + torch.randn(n, features, generator=g)
    return {"inputs": inputs, "targets": targets}


@pytest.fixture
def blobs() -> dict:
    return make_blobs()


def tiny_model(features: int = 8, classes: int = 4, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))
    return Classifier(net, classes, kind="mlp")


def loaders(data: dict, batch_size: int = 16, seed: int = 0):
    train = TensorBatchLoader(data, batch_size, shuffle=True, drop_last=True, seed=seed)
    evaluation = TensorBatchLoader(data, 32)
    return train, evaluation


@pytest.fixture
def one_thread():
    """Run the test single-threaded: tiny models run fastest so, above all on a shared CPU.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Losses(Callback):
    """Records the training loss after every batch."""

    def __init__(self):
        self.losses = []

    def batch_end(self, state, logger):
        self.losses.append(float(state.train_metrics["loss"]))


# -- images -----------------------------------------------------------------------------------


def random_images(n: int = 32, size: int = 16, classes: int = 4, seed: int = 0) -> dict:
    """Gaussian images ``[n, 3, size, size]`` and random class targets, from one generator."""
    g = torch.Generator().manual_seed(seed)
    return {
        "inputs": torch.randn(n, 3, size, size, generator=g),
        "targets": torch.randint(0, classes, (n,), generator=g),
    }


def image_loader(
    n: int = 32, size: int = 16, classes: int = 4, batch_size: int = 8
) -> TensorBatchLoader:
    """A shuffled training loader over :func:`random_images`."""
    data = random_images(n, size, classes)
    return TensorBatchLoader(data, batch_size, shuffle=True, drop_last=True, seed=0)


def tiny_resnet(width: int = 8, classes: int = 4, seed: int = 0) -> Classifier:
    """A one-block-per-stage CIFAR ResNet, seeded."""
    torch.manual_seed(seed)
    return Classifier(CifarResNet(1, num_classes=classes, width=width), classes, kind="cnn")


def sgd_image_trainer(
    model: Classifier, algorithm, steps: int = 20, callbacks=(), **kwargs
) -> Trainer:
    """A CPU Trainer (SGD, lr 0.05) of ``model`` with ``algorithm`` for ``steps`` batches of
    :func:`image_loader`; not fitted yet. ``kwargs`` go to the Trainer."""
    return Trainer(
        model,
        image_loader(),
        f"{steps}ba",
        algorithms=[algorithm],
        callbacks=list(callbacks),
        optimizer={"name": "sgd", "lr": 0.05},
        device="cpu",
        data_kind="image",
        **kwargs,
    )


def optimizer_parameter_ids(trainer: Trainer) -> list[int]:
    """ids of the tensors the trainer's optimizer holds, in group order."""
    return [id(p) for group in trainer.state.optimizer.param_groups for p in group["params"]]


class SeenInputs(Callback):
    """Records ``record(inputs)`` of every training and evaluation batch, and the losses."""

    def __init__(self, record=torch.clone):
        self.record = record
        self.train, self.eval, self.losses = [], [], []

    def before_forward(self, state, logger):
        self.train.append(self.record(state.batch["inputs"]))

    def before_backward(self, state, logger):
        self.losses.append(state.loss.detach())

    def eval_before_forward(self, state, logger):
        self.eval.append(self.record(state.batch["inputs"]))


def fit_small_cnn(
    data: dict,
    algorithm,
    steps: int,
    callbacks=(),
    eval_data: dict | None = None,
    eval_batch_size: int = 16,
    checkpoint=None,
    save_to=None,
):
    """Train a seeded 10-class SmallCNN2d with ``algorithm`` for ``steps`` batches of 8 from
    ``data`` (evaluating on ``eval_data`` if given), resuming from ``checkpoint`` if given.
    Returns the checkpoint saved to ``save_to``, if given."""
    torch.manual_seed(0)
    trainer = Trainer(
        Classifier(SmallCNN2d(3, 10, channels=4), 10),
        TensorBatchLoader(data, 8, shuffle=True, drop_last=True),
        f"{steps}ba",
        eval_dataloader=eval_data and TensorBatchLoader(eval_data, eval_batch_size),
        algorithms=[algorithm],
        callbacks=list(callbacks),
        data_kind="image",
    )
    if checkpoint is not None:
        trainer.load_checkpoint(checkpoint)
    trainer.fit()
    return trainer.save_checkpoint(save_to) if save_to is not None else None


# -- text -------------------------------------------------------------------------------------


def masked_token_data(n: int, seq: int, vocab: int, label_rate: float, seed: int = 0) -> dict:
    """Random token ids ``[n, seq]`` below ``vocab`` with an all-ones attention mask; about
    ``label_rate`` of the positions are MLM labels (their own id), the rest ``-100``."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (n, seq), generator=g)
    labels = torch.where(torch.rand(n, seq, generator=g) < label_rate, input_ids, -100)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


# -- interrupting runs ------------------------------------------------------------------------


class CrashAt(Callback):
    """Simulates a crash (an exception) after step ``batch``."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_end(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch == self.batch:
            raise RuntimeError(f"simulated crash at step {self.batch}")


class CountBatches(Callback):
    """Counts the batches the data loader delivered (a resume must not load skipped ones)."""

    def __init__(self) -> None:
        self.loaded = 0

    def after_dataloader(self, state: State, logger: Logger) -> None:
        self.loaded += 1
