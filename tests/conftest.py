"""Shared fixtures: tiny in-memory data and models that train in milliseconds."""

from __future__ import annotations

import copy
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.callback import Callback
from speedup.data import DataInfo, TensorBatchLoader
from speedup.engine import Plan, build_plan
from speedup.event import Event
from speedup.models import Classifier
from speedup.models.language import bert, gpt2
from speedup.models.nets import SmallCNN2d
from speedup.models.vision import CifarResNet
from speedup.trainer import Trainer

if TYPE_CHECKING:
    from pathlib import Path

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


def groupnorm_net(*groups: int, width: int = 8, classes: int = 4) -> nn.Sequential:
    """A small image net: for each of ``groups``, a 3x3 conv to ``width`` channels, a GroupNorm
    of that many groups and a ReLU; then global average pooling and a linear head."""
    layers, channels = [], 3
    for count in groups:
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(count, width), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def algorithm_trainer(
    model: nn.Module,
    loader: TensorBatchLoader,
    algorithm: Algorithm,
    steps: int = 20,
    callbacks: Sequence[Callback] = (),
    lr: float = 0.05,
    optimizer: str | dict = "sgd",
    device: str = "cpu",
    **kwargs: Any,
) -> Trainer:
    """A Trainer of ``model`` on ``loader`` for ``steps`` batches with ``algorithm`` alone,
    optimised by ``optimizer`` (a name, at ``lr``, or a whole spec); not fitted yet.
    ``kwargs`` go to the Trainer."""
    spec = {"name": optimizer, "lr": lr} if isinstance(optimizer, str) else optimizer
    return Trainer(
        model,
        loader,
        f"{steps}ba",
        algorithms=[algorithm],
        callbacks=list(callbacks),
        optimizer=spec,
        device=device,
        **kwargs,
    )


def sgd_image_trainer(
    model: Classifier, algorithm: Algorithm, steps: int = 20, callbacks=(), **kwargs: Any
) -> Trainer:
    """A CPU Trainer (SGD, lr 0.05) of ``model`` with ``algorithm`` for ``steps`` batches of
    :func:`image_loader`; not fitted yet. ``kwargs`` go to the Trainer."""
    return algorithm_trainer(
        model, image_loader(), algorithm, steps, callbacks, data_kind="image", **kwargs
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


def text_info(seq: int, vocab: int) -> DataInfo:
    """The DataInfo of token sequences of length ``seq`` over ``vocab`` ids."""
    return DataInfo(kind="text", input_shape=(seq,), num_classes=vocab, tokens_per_sample=seq)


def token_ids(vocab: int, rows: int, length: int, seed: int = 1) -> torch.Tensor:
    """Random token ids ``[rows, length]`` below ``vocab``, from their own generator."""
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def tiny_language_model(
    info: DataInfo, family: str, attention: str | None = None, seed: int = 0, **kwargs: object
) -> Classifier:
    """A seeded tiny ``family`` ("gpt2" or "bert") model; ``kwargs`` go to the builder.

    ``attention`` rebuilds it from its config with that implementation (the same weights, by
    the same seed), as transformers before 4.48 (GPT-2) and 5.0 (BERT) fix the attention class
    when the model is built; a transformers without SDPA for the family skips the test."""
    torch.manual_seed(seed)
    model = {"gpt2": gpt2, "bert": bert}[family](info, size="tiny", **kwargs)
    config = model.net.config
    if attention is not None and config._attn_implementation != attention:
        if attention == "sdpa" and not type(model.net)._supports_sdpa:
            import transformers

            pytest.skip(f"transformers {transformers.__version__} has no SDPA {family}")
        config._attn_implementation = attention
        torch.manual_seed(seed)
        model.net = type(model.net)(config)
    return model


def capture(module: nn.Module, submodule: nn.Module) -> dict[str, torch.Tensor]:
    """Records the input of ``submodule`` (the projection) as ``"x"`` and the first output of
    ``module`` as ``"out"`` (hooks that return None, so the model runs unchanged)."""
    seen = {}

    def record_input(m: nn.Module, args: tuple) -> None:
        seen["x"] = args[0]

    def record_output(m: nn.Module, args: tuple, out: tuple) -> None:
        seen["out"] = out[0]

    submodule.register_forward_pre_hook(record_input)
    module.register_forward_hook(record_output)
    return seen


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


class SaveAt(Callback):
    """Keeps ``save(state)`` (a checkpoint's path, a :func:`snapshot`) as ``saved`` at the
    checkpoint point of batch ``at``, or of epoch ``at`` with ``unit="epoch"``."""

    def __init__(self, at: int, save: Callable[[State], object], unit: str = "batch") -> None:
        self.at, self.save, self.unit, self.saved = at, save, unit, None

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.unit == "batch" and state.timestamp.batch == self.at:
            self.saved = self.save(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.unit == "epoch" and state.timestamp.epoch == self.at:
            self.saved = self.save(state)


def snapshot(state: State, **algorithms: Algorithm) -> dict:
    """A deep copy of what a resume by hand needs: the model's, the optimizer's and the
    timestamp's state, and each of ``algorithms``' under its keyword."""
    parts = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "timestamp": state.timestamp.state_dict(),
    }
    return copy.deepcopy(parts | {key: a.state_dict() for key, a in algorithms.items()})


def through_torch_save(obj: object) -> object:
    """``obj`` saved and loaded again with ``weights_only=True``, which loads tensors and plain
    containers only: an algorithm's state must be made of them."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def load_optimizer_and_time(trainer: Trainer, saved: dict) -> None:
    """Puts a :func:`snapshot`'s optimizer state and timestamp into ``trainer``."""
    trainer.state.optimizer.load_state_dict(saved["optimizer"])
    trainer.state.timestamp.load_state_dict(saved["timestamp"])


class CountBatches(Callback):
    """Counts the batches the data loader delivered (a resume must not load skipped ones)."""

    def __init__(self) -> None:
        self.loaded = 0

    def after_dataloader(self, state: State, logger: Logger) -> None:
        self.loaded += 1


# -- plans ------------------------------------------------------------------------------------


def plan_of(
    algorithms: Sequence[Algorithm],
    model_kind: str | None = None,
    data_kind: str | None = None,
    **kwargs: Any,
) -> Plan:
    """The plan of ``algorithms`` in this recipe order, as the Trainer makes it: from their
    declarations, each instance also asked ``check_composition``. ``kwargs`` go to
    ``build_plan``."""
    declarations = {a.name: a.declare() for a in algorithms}
    return build_plan(declarations, model_kind, data_kind, algorithms=algorithms, **kwargs)


def stand_in(name: str, events: dict[Event, Access]) -> Algorithm:
    """An algorithm named ``name`` that declares ``events`` and nothing else (it never acts):
    another algorithm or a plugin, as far as a plan can tell."""

    class StandIn(Algorithm):
        def declare(self) -> Declaration:
            return Declaration(events)

    StandIn.name = name
    return StandIn()


# -- runs from the command line --------------------------------------------------------------


def smoke_run(run_dir: Path, *overrides: str) -> int:
    """Runs the quickstart recipe with ``--smoke`` and ``overrides`` into ``run_dir`` through
    the command line, without a progress bar; returns the exit code."""
    from speedup.cli import main  # here, not above: most tests never load the command line

    return main(
        ["run", "quickstart", "--smoke", f"run_dir={run_dir}", "progress_bar=false", *overrides]
    )


def metrics_records(run_dir: Path) -> list[dict]:
    """The records a run wrote to ``run_dir/metrics.jsonl``, in order."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- refusals ---------------------------------------------------------------------------------
# Every algorithm refuses bad arguments the same way; each test module keeps its own table of
# cases and binds the one test written here to a ``test_...`` name, which pytest collects.


def bad_arguments_test(
    make: Callable[..., object], cases: list[tuple[dict, str]]
) -> Callable[[dict, str], None]:
    """A test that ``make(**kwargs)`` raises ValueError matching the regex ``needle``, for
    each ``(kwargs, needle)`` of ``cases``."""

    @pytest.mark.parametrize(("kwargs", "needle"), cases)
    def test(kwargs: dict, needle: str) -> None:
        with pytest.raises(ValueError, match=needle):
            make(**kwargs)

    return test


def bad_overrides_test(
    cases: list[tuple[str, str]], base: Sequence[str] = (), recipe: str = "quickstart"
) -> Callable[[str, str], None]:
    """A test that loading ``recipe`` with the overrides ``base`` and then ``override`` raises
    a ConfigError whose text holds ``message`` literally, for each ``(override, message)`` of
    ``cases``."""

    from speedup.config import ConfigError, load_config

    @pytest.mark.parametrize(("override", "message"), cases)
    def test(override: str, message: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(recipe, [*base, override])

    return test


def cli_refusal_test(
    recipe: str, cases: list[tuple[str, list[str]]]
) -> Callable[[pytest.CaptureFixture, str, list[str]], None]:
    """A test that ``speedup plan recipe override`` exits 2 printing exactly one ``error:``
    line, no traceback, holding every one of ``needles``, for each ``(override, needles)``."""

    from speedup.cli import main

    @pytest.mark.parametrize(("override", "needles"), cases)
    def test(capsys: pytest.CaptureFixture, override: str, needles: list[str]) -> None:
        assert main(["plan", recipe, override]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert all(needle in lines[0] for needle in needles), lines[0]

    return test
