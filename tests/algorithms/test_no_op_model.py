import math
from types import SimpleNamespace

import pytest
import torch
from conftest import Losses, text_info
from speedup.algorithms.factorize import Factorize
from speedup.algorithms.gyro_dropout import GyroDropout
from speedup.algorithms.magnitude_pruning import MagnitudePruning
from speedup.algorithms.no_op_model import (
    SURGERY,
    NoOpModel,
    OneParameterModel,
    output_shape_fn,
    to_no_op_model,
)
from torch import nn

from speedup.data import TensorBatchLoader
from speedup.engine import PlanError
from speedup.event import Event
from speedup.models import Classifier
from speedup.models.base import Model
from speedup.models.language import gpt2
from speedup.models.nets import SmallCNN2d
from speedup.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def image_loader(n=64, batch_size=16):
    g = torch.Generator().manual_seed(0)
    data = {"inputs": torch.randn(n, 3, 8, 8, generator=g), "targets": torch.arange(n) % 4}
    return TensorBatchLoader(data, batch_size, shuffle=True, drop_last=True, seed=0)


def text_loader(n=32, seq_len=16, vocab=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, seq_len), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return TensorBatchLoader(data, 8, shuffle=True, drop_last=True, seed=0)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_an_image_classifier_becomes_one_parameter_and_trains_twenty_steps():
    torch.manual_seed(0)
    original = Classifier(SmallCNN2d(3, 4, channels=8), 4)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    algorithm, losses = NoOpModel(), Losses()
    trainer = Trainer(
        original,
        image_loader(),
        "20ba",
        eval_dataloader=image_loader(32, 32),
        algorithms=[algorithm],
        callbacks=[losses],
        optimizer={"name": "sgd", "lr": 0.5},
        device="cpu",
    )
    model = trainer.state.model
    assert isinstance(model, OneParameterModel) and algorithm.original is original
    assert [p.numel() for p in trainable(model)] == [1]
    in_optimizer = [p for g in trainer.state.optimizer.param_groups for p in g["params"]]
    assert len(in_optimizer) == 1 and in_optimizer[0] is model.weight
    assert list(model.state_dict()) == ["weight"]  # the checkpoint holds one number
    assert model.kind == original.kind == "cnn"
    metrics = trainer.fit()
    assert len(losses.losses) == 20 and all(math.isfinite(v) for v in losses.losses)
    assert losses.losses[0] == pytest.approx(math.log(4), abs=1e-6)  # uniform at w = 0
    assert model.weight.item() != 0.0  # a real gradient reached it
    assert {"loss", "accuracy"} <= set(metrics)  # the classifier's own metrics
    for name, value in original.state_dict().items():  # the real model was never touched
        assert torch.equal(value, before[name]), name


def test_a_tiny_gpt2_becomes_one_parameter_and_trains_twenty_steps():
    torch.manual_seed(0)
    info = text_info(16, 64)
    original = gpt2(info, size="tiny")
    assert sum(p.numel() for p in trainable(original)) > 100_000
    losses = Losses()
    trainer = Trainer(
        original,
        text_loader(),
        "20ba",
        eval_dataloader=text_loader(16),
        algorithms=[NoOpModel()],
        callbacks=[losses],
        optimizer={"name": "adamw", "lr": 0.01},
        tokens_per_sample=16,
        device="cpu",
    )
    model = trainer.state.model
    assert [p.numel() for p in trainable(model)] == [1]
    in_optimizer = [p for g in trainer.state.optimizer.param_groups for p in g["params"]]
    assert in_optimizer == [model.weight]
    batch = next(iter(text_loader()))
    assert model(batch).shape == (8, 16, 64)  # [N, T, vocab]
    assert model.loss_weight(batch) == 8 * 15  # causal LM: next-token labels
    metrics = trainer.fit()
    assert len(losses.losses) == 20 and all(math.isfinite(v) for v in losses.losses)
    assert losses.losses[0] == pytest.approx(math.log(64), abs=1e-5)
    assert "perplexity" in metrics  # the language model's own finalize_metrics
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)


def test_output_shapes_for_each_kind_of_model():
    batch = {"inputs": torch.zeros(5, 3), "targets": torch.zeros(5, dtype=torch.long)}
    shape_of, classes = output_shape_fn(Classifier(nn.Linear(3, 7), 7))
    assert shape_of(batch) == (5, 7) and classes == 7
    tokens = {"input_ids": torch.zeros(2, 9, dtype=torch.long)}
    hf = SimpleNamespace(task="mlm", net=SimpleNamespace(config=SimpleNamespace(vocab_size=50)))
    assert output_shape_fn(hf)[0](tokens) == (2, 9, 50)
    config = SimpleNamespace(vocab_size=50, num_labels=3)
    classification = SimpleNamespace(task="classification", net=SimpleNamespace(config=config))
    assert output_shape_fn(classification)[0](tokens) == (2, 3)
    out = to_no_op_model(Classifier(nn.Linear(3, 7), 7))(batch)
    assert out.shape == (5, 7) and torch.all(out == 0)


class Opaque(Model):
    def forward(self, batch):
        return batch["inputs"]


def test_a_model_of_unknown_output_shape_is_refused_at_init():
    loader = TensorBatchLoader({"inputs": torch.zeros(8, 3)}, 4)
    with pytest.raises(ValueError, match="cannot tell the output shape of Opaque"):
        Trainer(Opaque(), loader, "1ba", algorithms=[NoOpModel()], device="cpu")


def test_declaration_runs_after_all_surgery_and_refuses_pruning():
    decl = NoOpModel().declare()
    assert set(decl.events) == {Event.INIT}
    assert decl.events[Event.INIT].writes == {"model.modules", "model.weights"}
    assert decl.runs_after == SURGERY and "no_op_model" not in SURGERY
    assert len(SURGERY) == 15
    with pytest.raises(PlanError, match="no_op_model and magnitude_pruning"):
        Trainer(
            Classifier(SmallCNN2d(3, 4, channels=8), 4),
            image_loader(),
            "1ba",
            algorithms=[NoOpModel(), MagnitudePruning()],
            device="cpu",
        )


def test_listed_first_it_still_replaces_the_model_after_the_other_surgery():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.Linear(32, 4))
    factorize, gyro = Factorize(min_features=16, latent_features=4), GyroDropout(sigma=4, tau=2)
    data = {"inputs": torch.randn(32, 16), "targets": torch.arange(32) % 4}
    trainer = Trainer(
        Classifier(net, 4),
        TensorBatchLoader(data, 8, shuffle=True, drop_last=True, seed=0),
        "2ba",
        algorithms=[NoOpModel(), gyro, factorize],
        device="cpu",
    )
    assert trainer.engine.plan.order[Event.INIT] == ["factorize", "gyro_dropout", "no_op_model"]
    assert factorize.replaced == ["net.0"] and len(gyro.layers) == 1  # both acted first
    assert isinstance(trainer.state.model, OneParameterModel)
    trainer.fit()
