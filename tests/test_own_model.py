"""The Trainer takes the user's own model and data (speedup/adapters.py), the algorithm
classes and functional twins import lazily by name, and docs/own-model.md runs as written.

Every number the page's snippets report is checked against a computation written here
independently (the net's own predictions, HF's own ``.loss``, F1 from confusion counts)."""

from __future__ import annotations

import collections
import importlib
import math
import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import speedup.algorithms
import speedup.functional as sf
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from speedup.adapters import (
    DictBatchLoader,
    EvalMetrics,
    HFLossModel,
    HFTaskModel,
    ModuleModel,
    as_batch,
    hf_task,
)
from speedup.algorithm import Algorithm
from speedup.callback import Callback
from speedup.config import ConfigError
from speedup.data import TensorBatchLoader
from speedup.engine import PlanError
from speedup.models import Classifier
from speedup.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "own-model.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def run_blocks(*indices: int) -> dict:
    """Run the page's python blocks ``indices`` in order in one namespace (a reader's session)."""
    namespace: dict = {"__name__": "own_model_page"}
    code = blocks("python")
    for i in indices:
        exec(compile(code[i], f"{PAGE.name}[python block {i}]", "exec"), namespace)
    return namespace


def tuple_data(n: int = 64, features: int = 8, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def mlp(features: int = 8, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def tuple_loader(batch_size: int = 16, **kwargs) -> DataLoader:
    return DataLoader(TensorDataset(*tuple_data(**kwargs)), batch_size=batch_size)


# -- the page -------------------------------------------------------------------------------


def test_the_page_is_linked_and_every_python_block_is_tested():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/own-model.md)" in readme
    # Four blocks, each run by a test below: a new block needs a test of its own.
    assert len(blocks("python")) == 4


def test_plain_module_snippet_reaches_its_accuracy():
    ns = run_blocks(0)
    trainer, net, metrics = ns["trainer"], ns["net"], ns["metrics"]
    assert trainer.state.model.net is net  # trained in place, not copied
    assert [a.name for a in trainer.state.algorithms] == ["label_smoothing"]
    inputs, targets = ns["inputs"][2500:], ns["targets"][2500:]
    net.eval()
    with torch.no_grad():
        logits = net(inputs)
    reference_accuracy = (logits.argmax(1) == targets).float().mean().item()
    assert metrics["accuracy"] == pytest.approx(reference_accuracy, abs=1e-6)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    assert metrics["accuracy"] >= 0.9  # 4 classes: chance is 0.25


def macro_f1(predicted: torch.Tensor, targets: torch.Tensor, classes: int) -> float:
    """The mean over classes of 2TP / (2TP + FP + FN), from confusion counts."""
    scores = []
    for c in range(classes):
        tp = int(((predicted == c) & (targets == c)).sum())
        fp = int(((predicted == c) & (targets != c)).sum())
        fn = int(((predicted != c) & (targets == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / classes


def test_metrics_snippet_reports_torchmetrics_values():
    ns = run_blocks(0, 1)
    metrics, net = ns["metrics"], ns["net"]
    assert set(metrics) == {"loss", "accuracy", "f1"}
    assert [a.name for a in ns["trainer"].state.algorithms] == [
        "label_smoothing",
        "gradient_clipping",
    ]
    assert ns["trainer"].state.algorithms[1].clipping_threshold == 1.0
    inputs, targets = ns["inputs"][2500:], ns["targets"][2500:]
    net.eval()
    with torch.no_grad():
        predicted = net(inputs).argmax(1)
    accuracy = (predicted == targets).float().mean().item()
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["f1"] == pytest.approx(macro_f1(predicted, targets, 4), abs=1e-6)
    assert metrics["accuracy"] >= 0.9


def test_hugging_face_snippet_reaches_its_accuracy():
    ns = run_blocks(2)
    metrics, model = ns["metrics"], ns["model"]
    assert isinstance(ns["trainer"].state.model, HFTaskModel)
    assert ns["trainer"].state.model.kind == "gpt2"
    (batch,) = list(ns["test"])  # one batch of all 128 test sequences
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    # Next-token accuracy: position t predicts token t+1.
    predicted = out.logits[:, :-1].argmax(-1)
    reference = (predicted == batch["labels"][:, 1:]).float().mean().item()
    assert metrics["accuracy"] == pytest.approx(reference, abs=1e-6)
    assert metrics["loss"] == pytest.approx(out.loss.item(), rel=1e-4)  # HF's own loss
    assert metrics["perplexity"] == pytest.approx(math.exp(out.loss.item()), rel=1e-4)
    assert metrics["accuracy"] >= 0.9  # 16 tokens: chance is 1/16


def test_functional_snippet_reaches_its_accuracy_at_its_sparsity():
    ns = run_blocks(3)
    model, weights = ns["model"], ns["weights"]
    assert set(weights) == {"0.weight", "2.weight"}
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == total // 2 and ns["sparsity"] == 0.5
    for name, weight in weights.items():  # every pruned weight is still exactly zero
        assert torch.all(weight[ns["masks"][name] == 0] == 0)
    with torch.no_grad():
        predicted = model(ns["inputs"][2500:]).argmax(1)
    assert ns["accuracy"] == (predicted == ns["targets"][2500:]).float().mean().item()
    assert ns["accuracy"] >= 0.9


def the_page_errors() -> list[str]:
    """The errors the page shows, raised for real, in the page's order."""
    net = nn.Linear(8, 4)
    loader = tuple_loader()
    raised = []
    attempts = [
        lambda: Trainer(net, TensorDataset(*tuple_data()), "1ba"),
        lambda: Trainer(net, loader, "1ba", algorithms=["label_smothing"]),
        lambda: Trainer(net, loader, "1ba", algorithms=[{"label_smoothing": {"alfa": 0.1}}]),
        lambda: Trainer(net, [(torch.zeros(2, 8), torch.zeros(2), torch.zeros(2))], "1ba").fit(),
        lambda: Trainer(net, loader, "1ba", metrics=lambda outputs, targets: 0.0),
        lambda: Trainer(Classifier(net, 4), loader, "1ba", loss_fn=nn.CrossEntropyLoss()),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigError) as caught:
            attempt()
        raised.append(str(caught.value))
    return raised


def test_the_errors_on_the_page_are_the_errors_raised():
    shown = blocks("text")[-1].strip().splitlines()
    raised = the_page_errors()
    assert len(shown) == len(raised)
    for line, message in zip(shown, raised):
        if line.endswith("..."):  # the page shortens the list of every algorithm
            assert message.startswith(line[:-3]), (line, message)
        else:
            assert message == line


# -- models -----------------------------------------------------------------------------------


def test_model_errors_name_the_argument():
    loader = tuple_loader()
    with pytest.raises(ConfigError, match=r"^model: expected a torch nn.Module .* got list$"):
        Trainer([nn.Linear(8, 4)], loader, "1ba")
    with pytest.raises(ConfigError, match=r"^loss_fn: expected a callable .* got str$"):
        Trainer(nn.Linear(8, 4), loader, "1ba", loss_fn="mse")
    with pytest.raises(ConfigError, match=r"^metrics: Classifier is a speedup Model"):
        from torchmetrics.classification import MulticlassAccuracy

        Trainer(Classifier(nn.Linear(8, 4), 4), loader, "1ba", metrics=MulticlassAccuracy(4))


def test_a_loss_that_is_not_a_scalar_is_refused_at_the_first_batch():
    trainer = Trainer(
        mlp(), tuple_loader(), "1ba", loss_fn=nn.CrossEntropyLoss(reduction="none"), device="cpu"
    )
    with pytest.raises(ConfigError, match=r"^loss_fn: returned \[16\]; it must return .* scalar"):
        trainer.fit()


def test_custom_loss_regression_reports_its_loss_and_no_accuracy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    train = DataLoader(TensorDataset(x, y), batch_size=16)
    test = DataLoader(TensorDataset(x, y), batch_size=20)  # 20 + 20 + 8: uneven batches
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    trainer = Trainer(net, train, "3ba", eval_dataloader=test, loss_fn=nn.MSELoss(), device="cpu")
    metrics = trainer.fit()
    with torch.no_grad():
        reference = ((net(x) - y) ** 2).mean().item()
    assert set(metrics) == {"loss"}  # float targets: not a classification, no accuracy
    assert metrics["loss"] == pytest.approx(reference, rel=1e-5)
    assert trainer.state.model.kind == "mlp"


def test_per_sample_loss_matches_the_definition():
    g = torch.Generator().manual_seed(2)
    outputs, targets = torch.randn(5, 3, generator=g), torch.tensor([0, 2, 1, 1, 0])
    batch = {"inputs": torch.zeros(5, 1), "targets": targets}
    log_probs = outputs.log_softmax(1)
    default = ModuleModel(nn.Identity()).per_sample_loss(outputs, batch)
    torch.testing.assert_close(default, -log_probs[torch.arange(5), targets])
    # A loss_fn's per-sample loss is that function on each sample alone.
    smoothing = ModuleModel(nn.Identity(), loss_fn=nn.CrossEntropyLoss(label_smoothing=0.2))
    expected = -(0.8 * log_probs[torch.arange(5), targets] + 0.2 * log_probs.mean(1))
    torch.testing.assert_close(smoothing.per_sample_loss(outputs, batch), expected)
    assert smoothing.loss(outputs, batch).item() == pytest.approx(expected.mean().item())


def test_vision_only_algorithms_are_checked_against_the_inferred_kind():
    with pytest.raises(PlanError, match="blurpool does not apply to model kind 'mlp'"):
        Trainer(mlp(), tuple_loader(), "1ba", algorithms=["blurpool"])
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 8, 8, generator=g)
    loader = DataLoader(TensorDataset(images, torch.arange(8) % 2), batch_size=4)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 2))
    trainer = Trainer(cnn, loader, "1ba", algorithms=["blurpool"], data_kind="image")
    assert trainer.state.model.kind == "cnn"
    assert trainer.engine.plan.conflicts == []


# -- metrics ----------------------------------------------------------------------------------


def test_default_accuracy_accumulates_over_batches_then_starts_afresh():
    metrics = EvalMetrics()
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(30, 5, 4, 4, generator=g)  # dense prediction: [N, C, H, W]
    targets = torch.randint(0, 5, (30, 4, 4), generator=g)
    for start in (0, 10, 20):
        metrics.update(logits[start : start + 10], targets[start : start + 10])
    reference = (logits.argmax(1) == targets).float().mean().item()
    assert metrics.compute() == {"accuracy": pytest.approx(reference, abs=1e-6)}
    metrics.update(logits[:3], targets[:3])  # a new evaluation: the old batches are gone
    fresh = (logits[:3].argmax(1) == targets[:3]).float().mean().item()
    assert metrics.compute() == {"accuracy": pytest.approx(fresh, abs=1e-6)}
    metrics.update(torch.randn(4, 1), torch.randn(4, 1))  # regression: no accuracy
    assert metrics.compute() == {}


def test_metrics_are_named_and_per_class_values_expanded():
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall

    metrics = EvalMetrics([MulticlassAccuracy(3, average=None), MulticlassRecall(3)])
    outputs = torch.eye(3)[[0, 1, 2, 0, 0, 1]]  # predicts 0, 1, 2, 0, 0, 1
    targets = torch.tensor([0, 1, 1, 2, 0, 1])
    metrics.update(outputs, targets)
    # Per class: the fraction of its samples predicted right (0: 2/2, 1: 2/3, 2: 0/1).
    assert metrics.compute() == pytest.approx(
        {
            "multiclass_accuracy/0": 1.0,
            "multiclass_accuracy/1": 2 / 3,
            "multiclass_accuracy/2": 0.0,
            "multiclass_recall": (1.0 + 2 / 3 + 0.0) / 3,
        }
    )
    collection = MetricCollection({"acc": MulticlassAccuracy(3, average="micro")}, prefix="val_")
    metrics = EvalMetrics(collection)  # a collection's own names, prefix included
    metrics.update(outputs, targets)
    assert metrics.compute() == pytest.approx({"val_acc": 4 / 6})


def test_metric_errors_say_what_is_expected():
    from torchmetrics.classification import MulticlassAccuracy

    cases = [
        ({"loss": MulticlassAccuracy(3)}, r"^metrics: the name 'loss' is the model's own loss"),
        (
            [MulticlassAccuracy(3), MulticlassAccuracy(3, average="micro")],
            r"^metrics: two metrics would both be named 'multiclass_accuracy'; pass a dict",
        ),
        ({"acc": "accuracy"}, r"^metrics.acc: expected a torchmetrics Metric.*; got str$"),
        (0.5, r"^metrics: expected a torchmetrics Metric.*; got float$"),
    ]
    for metrics, message in cases:
        with pytest.raises(ConfigError, match=message):
            Trainer(mlp(), tuple_loader(), "1ba", metrics=metrics)


# -- dataloaders ------------------------------------------------------------------------------


class ResumableTupleLoader:
    """A user's own loader: shuffled by ``(seed, epoch)``, with ``set_epoch`` and
    ``start_at``, yielding ``(inputs, targets)`` tuples; counts the batches it produces."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> None:
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size
        self.epoch, self._start, self.produced = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, batch: int) -> None:
        self._start = batch

    def __len__(self) -> int:
        return len(self.targets) // self.batch_size

    def __iter__(self):
        order = torch.randperm(
            len(self.targets), generator=torch.Generator().manual_seed(self.epoch)
        )
        first, self._start = self._start, 0
        for b in range(first, len(self)):
            self.produced += 1
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.inputs[index], self.targets[index]


class StopAt(Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_end(self, state, logger) -> None:
        if state.timestamp.batch == self.batch:
            state.stop_training("test")


def test_a_tuple_loader_keeps_its_length_epochs_and_exact_resume(tmp_path):
    data = tuple_data(n=64)

    def trainer(loader, callbacks=()):
        return Trainer(
            mlp(),
            loader,
            "8ba",  # two epochs of four batches
            optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
            callbacks=list(callbacks),
            device="cpu",
        )

    straight_loader = ResumableTupleLoader(*data, batch_size=16)
    straight = trainer(straight_loader)
    wrapped = straight.state.train_dataloader
    assert isinstance(wrapped, DictBatchLoader) and wrapped.loader is straight_loader
    assert len(wrapped) == 4 and wrapped.batch_size == 16
    straight.fit()
    assert straight_loader.epoch == 1  # set_epoch reached the loader through the wrapper

    interrupted = trainer(ResumableTupleLoader(*data, batch_size=16), [StopAt(5)])
    interrupted.fit()
    path = interrupted.save_checkpoint(tmp_path / "ck")
    resumed_loader = ResumableTupleLoader(*data, batch_size=16)
    resumed = trainer(resumed_loader)
    resumed.load_checkpoint(path)
    resumed.fit()
    assert resumed_loader.produced == 3  # batches 5..7 only: start_at skipped, nothing drained
    final = resumed.state.model.state_dict()
    for name, value in straight.state.model.state_dict().items():
        assert torch.equal(final[name], value), name


def test_batches_become_plain_dicts_of_tensors():
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert as_batch((x, y)) == {"inputs": x, "targets": y}
    assert as_batch([x, y], ("input_ids", "labels")) == {"input_ids": x, "labels": y}
    mapping = collections.UserDict({"inputs": x})  # like transformers' BatchEncoding
    assert type(as_batch(mapping)) is dict and as_batch(mapping) == {"inputs": x}
    with pytest.raises(ConfigError, match=r"^eval_dataloader: batch key 'text' holds a list"):
        as_batch({"inputs": x, "text": ["a", "b"]}, where="eval_dataloader")
    with pytest.raises(ConfigError, match=r"^train_dataloader: a batch must be an \(inputs, "):
        as_batch(x)


def test_speedup_loaders_are_used_unwrapped():
    x, y = tuple_data()
    loader = TensorBatchLoader({"inputs": x, "targets": y}, 16)
    trainer = Trainer(mlp(), loader, "1ba", eval_dataloader=loader)
    assert trainer.state.train_dataloader is loader and trainer.state.eval_dataloader is loader


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(8), torch.tensor(0)


def test_loader_errors_say_how_to_fix_them():
    from datasets import Dataset

    x, y = tuple_data()
    cases = [
        (None, r"^train_dataloader: required"),
        (TensorDataset(x, y), r"^train_dataloader: got a TensorDataset dataset, not a dataloader"),
        (
            Dataset.from_dict({"inputs": [[0.0]]}),
            r"^train_dataloader: got a Hugging Face Dataset, not a dataloader; wrap it .*"
            r"with_format\('torch'\)$",
        ),
        ({"inputs": x}, r"^train_dataloader: got a dict, not a dataloader; .*TensorBatchLoader"),
        (DataLoader(Stream(), batch_size=2), r"^train_dataloader: DataLoader has no len\(\)"),
        (DataLoader(TensorDataset(x, y), batch_size=100, drop_last=True), r"has no batches"),
        (42, r"^train_dataloader: expected a DataLoader \(an iterable of batches\), got int$"),
    ]
    for loader, message in cases:
        with pytest.raises(ConfigError, match=message):
            Trainer(mlp(), loader, "1ba")
    with pytest.raises(ConfigError, match=r"^eval_dataloader: got a TensorDataset"):
        Trainer(mlp(), tuple_loader(), "1ba", eval_dataloader=TensorDataset(x, y))


def test_a_dict_batch_without_the_expected_keys_is_named():
    loader = [{"x": torch.zeros(2, 8), "y": torch.zeros(2, dtype=torch.long)}]
    trainer = Trainer(mlp(), loader, "1ba", device="cpu")
    with pytest.raises(ConfigError, match=r"a plain module needs batch key\(s\) 'inputs'"):
        trainer.fit()


# -- algorithms -------------------------------------------------------------------------------


def test_algorithms_as_instances_names_and_mappings():
    from speedup.algorithms import EMA, GradientClipping, LabelSmoothing

    clipping = GradientClipping(clipping_threshold=2.0)
    trainer = Trainer(
        mlp(),
        tuple_loader(),
        "1ba",
        algorithms=["label_smoothing", {"ema": {"half_life": "10ba"}}, clipping],
    )
    smoothing, ema, same = trainer.state.algorithms
    assert type(smoothing) is LabelSmoothing and smoothing.alpha == 0.1  # its default
    assert type(ema) is EMA and str(ema.half_life) == "10ba"
    assert same is clipping
    # A whole mapping, in order, as a recipe's algorithms section is; a single name.
    mapping = {"label_smoothing": {"alpha": 0.25}, "gradient_clipping": None}
    built = Trainer(mlp(), tuple_loader(), "1ba", algorithms=mapping).state.algorithms
    assert [type(a) for a in built] == [LabelSmoothing, GradientClipping]
    assert built[0].alpha == 0.25
    single = Trainer(mlp(), tuple_loader(), "1ba", algorithms="label_smoothing").state.algorithms
    assert [a.name for a in single] == ["label_smoothing"]


def test_algorithm_errors_name_the_entry():
    from speedup.algorithms import LabelSmoothing

    cases = [
        (["nope"], r"^algorithms\[0\]: unknown algorithm 'nope'.*; available: alibi, "),
        (
            ["ema", {"label_smoothing": {"alpha": "high"}}],
            r"^Trainer\(algorithms=...\): algorithms.label_smoothing.alpha: wrong type: got "
            r"'high', expected float$",
        ),
        ([LabelSmoothing], r"^algorithms\[0\]: LabelSmoothing is a class; pass an instance, "),
        ([3], r"^algorithms\[0\]: expected an Algorithm, a registered name or .* got int$"),
        ([{"ema": {}, "swa": {}}], r"^algorithms\[0\]: a mapping names one algorithm"),
        ([{"ema": 0.5}], r"^algorithms\[0\]: the arguments of 'ema' must be a dict"),
        (5, r"^algorithms: expected a list of algorithms .* got int$"),
    ]
    for algorithms, message in cases:
        with pytest.raises(ConfigError, match=message):
            Trainer(mlp(), tuple_loader(), "1ba", algorithms=algorithms)


# -- Hugging Face -----------------------------------------------------------------------------


def tiny_bert(cls_name: str, **config):
    import transformers

    torch.manual_seed(0)
    settings = dict(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return getattr(transformers, cls_name)(transformers.BertConfig(**settings, **config))


def test_hugging_face_tasks_are_recognised():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    assert hf_task(gpt2) == "clm"
    assert hf_task(tiny_bert("BertForMaskedLM")) == "mlm"
    assert hf_task(tiny_bert("BertForSequenceClassification", num_labels=3)) == "classification"
    assert hf_task(tiny_bert("BertForSequenceClassification", num_labels=1)) is None  # regression
    assert hf_task(tiny_bert("BertForTokenClassification", num_labels=3)) is None


def test_hugging_face_classifier_with_tuple_batches_and_metrics():
    from torchmetrics.classification import MulticlassAccuracy

    net = tiny_bert("BertForSequenceClassification", num_labels=3)
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 32, (12, 6), generator=g), torch.arange(12) % 3
    loader = DataLoader(TensorDataset(ids, labels), batch_size=5)  # (input_ids, labels)
    trainer = Trainer(
        net, loader, "1ba", eval_dataloader=loader, metrics=MulticlassAccuracy(3, average="micro")
    )
    assert trainer.state.model.kind == "bert"
    metrics = trainer.eval()
    net.eval()
    with torch.no_grad():
        out = net(input_ids=ids, labels=labels)
    assert metrics["loss"] == pytest.approx(out.loss.item(), rel=1e-5)  # HF's own loss
    reference = (out.logits.argmax(-1) == labels).float().mean().item()
    assert metrics["multiclass_accuracy"] == pytest.approx(reference, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(reference, abs=1e-6)  # the adapter's own
    with pytest.raises(ConfigError, match=r"^loss_fn: BertForSequenceClassification is a Hug"):
        Trainer(net, loader, "1ba", loss_fn=nn.CrossEntropyLoss())


def test_other_hugging_face_models_train_on_their_own_loss():
    net = tiny_bert("BertForTokenClassification", num_labels=3)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 32, (4, 6), generator=g),
        "labels": torch.randint(0, 3, (4, 6), generator=g),
    }
    trainer = Trainer(net, [batch], "2ba", eval_dataloader=[batch], device="cpu")
    model = trainer.state.model
    assert isinstance(model, HFLossModel) and model.kind == "bert"
    before = trainer.eval()["loss"]
    net.eval()
    with torch.no_grad():
        assert before == pytest.approx(net(**batch).loss.item(), rel=1e-5)
    assert trainer.fit()["loss"] < before  # two steps on the one batch lower its loss


# -- lazy imports by name ---------------------------------------------------------------------


def test_every_registered_algorithm_is_importable_by_class_name():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    registered = project["project"]["entry-points"]["speedup.algorithms"]
    assert "label_smoothing" in registered
    for name, target in registered.items():
        module, _, attribute = target.partition(":")
        defined = getattr(importlib.import_module(module), attribute)
        assert getattr(speedup.algorithms, attribute) is defined, name
        assert attribute in speedup.algorithms.__all__ and attribute in dir(speedup.algorithms)


def test_every_functional_twin_is_in_speedup_functional():
    classes, twins = set(), set()
    for info in pkgutil.iter_modules(speedup.algorithms.__path__):
        module = importlib.import_module(f"speedup.algorithms.{info.name}")
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, Algorithm):
                classes.add(name)
                assert getattr(speedup.algorithms, name) is value, name
            else:
                assert name not in twins, f"{name} is exported by two algorithm modules"
                twins.add(name)
                assert getattr(sf, name) is value, f"{info.name}.{name}"
    assert set(sf.__all__) == twins and set(speedup.algorithms.__all__) == classes
    assert {"smooth_labels", "resize_batch", "magnitude_masks"} <= twins
    assert {"LabelSmoothing", "ProgressiveResizing", "MagnitudePruning"} <= classes


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="'speedup.functional' has no attribute 'nope'"):
        sf.nope  # noqa: B018
    with pytest.raises(AttributeError, match="'speedup.algorithms' has no attribute 'Nope'"):
        speedup.algorithms.Nope  # noqa: B018
    with pytest.raises(AttributeError):
        sf.LabelSmoothing  # noqa: B018  (a class: in speedup.algorithms, not here)
    from speedup.algorithms import label_smoothing  # a submodule still imports as one

    assert label_smoothing.smooth_labels is sf.smooth_labels


def test_names_load_lazily_without_torch():
    probe = textwrap.dedent(
        """
        import sys
        import speedup.algorithms, speedup.functional
        names = dir(speedup.algorithms) + dir(speedup.functional)
        print("torch" in sys.modules, "LabelSmoothing" in names, "resize_batch" in names)
        speedup.functional.smooth_labels
        print("speedup.algorithms.label_smoothing" in sys.modules,
              "speedup.algorithms.blurpool" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True", "True", "False"]
