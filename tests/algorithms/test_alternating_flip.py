"""Alternating flip (Jordan 2024): random per image in epoch 0, then alternating; exact resume."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from conftest import algorithm_trainer
from speedup.algorithms.alternating_flip import (
    AlternatingFlip,
    alternating_flip,
    epoch_zero_flips,
    flips_at_epoch,
)
from torch import nn
from torch.utils.data import DataLoader

from speedup.callback import Callback
from speedup.checkpoint import CheckpointSaver, list_checkpoints
from speedup.config import ConfigError, load_config
from speedup.data import TensorBatchLoader
from speedup.data.shapes2d import BatchToFloat
from speedup.models import Classifier
from speedup.trainer import Trainer

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

pytestmark = pytest.mark.usefixtures("one_thread")

N, WIDTH, BATCH = 64, 6, 8


# -- the functional twin -----------------------------------------------------------------------


def test_epoch_zero_flips_about_half_from_the_seed_alone():
    first = epoch_zero_flips(4000, seed=3)
    assert first.dtype == torch.bool and first.shape == (4000,)
    # Bernoulli(1/2) per image: 2000 +- 4 standard deviations (sqrt(1000) ~ 31.6).
    assert abs(int(first.sum()) - 2000) < 4 * 31.7
    assert torch.equal(first, epoch_zero_flips(4000, seed=3))
    assert not torch.equal(first, epoch_zero_flips(4000, seed=4))


def test_odd_epochs_flip_the_complement_and_even_epochs_repeat_epoch_zero():
    first = epoch_zero_flips(100, seed=0)
    for epoch in range(6):
        # The paper's rule, written out: even epochs as epoch 0, odd epochs the opposite.
        expected = [bool(f) != (epoch % 2 == 1) for f in first]
        assert flips_at_epoch(first, epoch).tolist() == expected
    assert not (flips_at_epoch(first, 0) & flips_at_epoch(first, 1)).any()


def test_alternating_flip_mirrors_exactly_the_images_it_says():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(10, 3, 4, 5, generator=g)
    first = epoch_zero_flips(10, seed=1)
    for epoch in (0, 1):
        out = alternating_flip(images, first, epoch)
        state = flips_at_epoch(first, epoch)
        for i in range(10):
            want = images[i, :, :, list(range(4, -1, -1))] if state[i] else images[i]
            assert torch.equal(out[i], want)
    # A batch with its training-set indices gets the same decisions as the whole set.
    indices = torch.tensor([7, 2, 2, 9])
    assert torch.equal(
        alternating_flip(images[indices], first, 1, indices),
        alternating_flip(images, first, 1)[indices],
    )
    with pytest.raises(ValueError, match="training-set indices"):
        alternating_flip(images[:3], first, 0)


# -- in a run: images that say which sample they are and which way round they are ---------------


def _encoded_data() -> dict[str, torch.Tensor]:
    """uint8 images whose channel 1 holds the sample index and whose channel 0 has a marker in
    the left-most column: a mirror moves it to the right-most one."""
    images = torch.zeros(N, 3, 4, WIDTH, dtype=torch.uint8)
    images[:, 1] = torch.arange(N, dtype=torch.uint8).view(N, 1, 1)
    images[:, 0, :, 0] = 255
    return {"inputs": images, "targets": torch.arange(N) % 4}


def _decode(inputs: torch.Tensor) -> tuple[list[int], list[bool]]:
    """(indices, mirrored) of a batch of :func:`_encoded_data` images after ``x / 255``."""
    indices = (inputs[:, 1, 0, 0] * 255).round().long().tolist()
    mirrored = (inputs[:, 0, 0, -1] > 0.5).tolist()
    left = (inputs[:, 0, 0, 0] > 0.5).tolist()
    assert all(m != lo for m, lo in zip(mirrored, left))  # exactly one side has the marker
    return indices, mirrored


class Seen(Callback):
    """(step, epoch, sample index, mirrored) of every training image, in order."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, bool]] = []

    def before_forward(self, state: State, logger: Logger) -> None:
        indices, mirrored = _decode(state.batch["inputs"])
        ts = state.timestamp
        self.rows += [(ts.batch, ts.epoch, i, m) for i, m in zip(indices, mirrored)]


def _model() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 4, 4))
    return Classifier(net, 4, kind="cnn")


def _trainer(data, algorithm, steps, callbacks=(), transform=None) -> Trainer:
    # The loader's own transform flips at random: the algorithm must switch it off.
    transform = transform or BatchToFloat(torch.zeros(3), torch.ones(3), flip=True)
    loader = TensorBatchLoader(
        data, BATCH, shuffle=True, drop_last=True, seed=5, transform=transform
    )
    return algorithm_trainer(
        _model(),
        loader,
        algorithm,
        steps,
        callbacks,
        lr=0.01,
        data_kind="image",
        seed=11,
        log_interval="0ba",
        eval_interval="1000ba",
    )


def test_every_sample_alternates_epoch_to_epoch_and_half_are_flipped_first():
    data = _encoded_data()
    transform = BatchToFloat(torch.zeros(3), torch.ones(3), flip=True)
    seen = Seen()
    flip = AlternatingFlip()
    epochs = 4
    _trainer(data, flip, epochs * N // BATCH, [seen], transform).fit()
    state: dict[tuple[int, int], bool] = {}
    for _, epoch, index, mirrored in seen.rows:
        assert (epoch, index) not in state  # each image once per epoch
        state[epoch, index] = mirrored
    assert len(state) == epochs * N
    for index in range(N):
        for epoch in range(1, epochs):
            assert state[epoch, index] == (state[0, index] != (epoch % 2 == 1))
    flipped_first = sum(state[0, i] for i in range(N))
    assert abs(flipped_first - N / 2) <= 4 * (N / 4) ** 0.5  # Bernoulli(1/2): N/2 +- 4 sd
    assert 0 < flipped_first < N
    # The mask is the run seed's (11), as the functional twin draws it.
    assert [state[0, i] for i in range(N)] == epoch_zero_flips(N, 11).tolist()
    # Nothing shared was changed: the loader's data dict and its transform object.
    assert transform.flip is True
    assert torch.equal(data["inputs"][:, 0, :, 0], torch.full((N, 4), 255, dtype=torch.uint8))


def test_a_run_resumed_mid_epoch_shows_every_image_as_the_uninterrupted_run(tmp_path):
    steps, resume_at = 3 * N // BATCH, N // BATCH + 3  # resume in the middle of epoch 1
    full = Seen()
    saver = CheckpointSaver(
        tmp_path, f"{resume_at}ba", keep_last=0, save_final=False, handle_signals=False
    )
    _trainer(_encoded_data(), AlternatingFlip(seed=7), steps, [full, saver]).fit()
    (checkpoint,) = [p for p in list_checkpoints(tmp_path) if p.name.endswith(f"-ba{resume_at}")]
    resumed = Seen()
    trainer = _trainer(_encoded_data(), AlternatingFlip(), steps, [resumed])  # seed from the file
    trainer.load_checkpoint(checkpoint)
    trainer.fit()
    assert resumed.rows and resumed.rows[0][0] == resume_at
    assert resumed.rows == [row for row in full.rows if row[0] >= resume_at]
    assert trainer.state.algorithms[0].seed == 7


def test_a_dataset_loader_is_refused_before_training():
    data = _encoded_data()
    samples = [{"inputs": x.float(), "targets": t} for x, t in zip(data["inputs"], data["targets"])]
    trainer = Trainer(
        _model(),
        DataLoader(samples, batch_size=BATCH),
        "4ba",
        algorithms=[AlternatingFlip()],
        device="cpu",
        data_kind="image",
    )
    with pytest.raises(
        ConfigError, match="alternating_flip: needs a train dataloader over in-memory"
    ):
        trainer.fit()
    assert trainer.state.timestamp.batch == 0


def test_a_transform_without_a_flip_switch_is_named_in_a_warning():
    def to_float(batch):
        return {**batch, "inputs": batch["inputs"].float() / 255}

    with pytest.warns(UserWarning, match="to_float.*no `flip` switch"):
        _trainer(_encoded_data(), AlternatingFlip(), 2, transform=to_float).fit()


def test_bad_seed_fails_validation_naming_the_key():
    with pytest.raises(ValueError, match="alternating_flip.seed"):
        AlternatingFlip(seed="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="algorithms.alternating_flip.seed"):
        load_config("shapes2d-baseline", ["algorithms.alternating_flip.seed=1.5"])
