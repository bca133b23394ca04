"""What users already have, turned into what the Trainer drives.

:class:`~speedup.trainer.Trainer` accepts a plain ``nn.Module`` (with an optional
``loss_fn``), a Hugging Face model, or a speedup :class:`~speedup.model.Model`;
dataloaders that yield ``(inputs, targets)`` tuples or dicts; algorithms as instances, names
or ``{name: kwargs}``; and ``metrics`` as torchmetrics metrics. :func:`adapt_inputs` turns
them into a ``Model``, dict-yielding loaders and ``Algorithm`` instances, and says exactly
what was expected when an argument has the wrong shape.

The wrapped module is the user's own object (trained in place, reachable as ``model.net``);
wrapped loaders keep the loader's length, ``batch_size``, ``set_epoch``, ``start_at`` and
``sampler``, so epoch seeding and sample-exact resume work as they did on the loader itself.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from speedup.algorithm import Algorithm
from speedup.errors import ConfigError, UnknownNameError
from speedup.model import HFModel, Model, infer_kind, soft_cross_entropy

__all__ = [
    "AdaptedInputs",
    "DictBatchLoader",
    "EvalMetrics",
    "HFLossModel",
    "HFTaskModel",
    "ModuleModel",
    "adapt_inputs",
    "as_algorithms",
    "as_batch",
    "as_loader",
    "as_model",
    "hf_task",
]

Batch = dict[str, torch.Tensor]
#: A loss function: ``(outputs, targets) -> scalar mean loss``.
LossFn = Callable[[Any, Any], torch.Tensor]
#: The batch keys of ``(inputs, targets)`` tuples, for models that do not say otherwise.
TUPLE_KEYS = ("inputs", "targets")


def _error(message: str) -> Exception:
    """The project's error for bad user input (the CLI turns it into exit code 2)."""
    return ConfigError(message)


def _type_name(value: object) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


# -- metrics ----------------------------------------------------------------------------------


def _snake_case(name: str) -> str:
    """``MulticlassF1Score`` -> ``multiclass_f1_score`` (how an unnamed metric is reported)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _metric_dict(metrics: Any) -> dict[str, Any]:
    """``metrics=`` as ``{name: torchmetrics.Metric}``."""
    from torchmetrics import Metric, MetricCollection

    expected = (
        "expected a torchmetrics Metric, a list of them, a dict {name: Metric} or a "
        "MetricCollection"
    )
    if isinstance(metrics, MetricCollection):
        named = dict(metrics.items(keep_base=False, copy_state=False))
    elif isinstance(metrics, Metric):
        named = {_snake_case(type(metrics).__name__): metrics}
    elif isinstance(metrics, Mapping):
        named = dict(metrics)
        for name in named:
            if not isinstance(name, str):
                raise _error(f"metrics: names must be strings, got {name!r}")
    elif isinstance(metrics, Sequence) and not isinstance(metrics, str):
        named = {}
        for metric in metrics:
            name = _snake_case(type(metric).__name__)
            if name in named:
                raise _error(
                    f"metrics: two metrics would both be named {name!r}; pass a dict "
                    "{name: metric} to name them"
                )
            named[name] = metric
    else:
        raise _error(f"metrics: {expected}; got {_type_name(metrics)}")
    for name, metric in named.items():
        if not isinstance(metric, Metric):
            hint = " (wrap a function with torchmetrics' own classes)" if callable(metric) else ""
            raise _error(f"metrics.{name}: {expected}; got {_type_name(metric)}{hint}")
    if "loss" in named:
        raise _error("metrics: the name 'loss' is the model's own loss; name the metric otherwise")
    return named


def _classes_and_targets(
    outputs: Any, targets: Any, soft_targets: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Scores ``[N, C, ...]`` and class-index targets ``[N, ...]``, or None when the pair is
    not a classification (then accuracy means nothing). With ``soft_targets``, targets shaped
    like the scores are class probabilities (cross-entropy reads them so) and count as their
    most probable class."""
    if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return None
    if not outputs.dtype.is_floating_point or outputs.dim() < 2:
        return None
    if soft_targets and targets.dtype.is_floating_point and targets.shape == outputs.shape:
        targets = targets.argmax(1)
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        return None
    expected = (outputs.shape[0], *outputs.shape[2:])
    return (outputs, targets) if tuple(targets.shape) == expected else None


class EvalMetrics:
    """torchmetrics metrics fed every evaluation batch and computed once per evaluation.

    With no metrics given, classification gets accuracy (torchmetrics'
    ``MulticlassAccuracy``, micro-averaged: the fraction of samples whose highest score is
    the target), built on the first batch from the number of scores. Metrics synchronise
    across processes themselves when computed (torch.distributed), so a data-parallel
    evaluation reports the metric of all its shards together.
    """

    def __init__(self, metrics: Any = None, soft_targets: bool = False) -> None:
        self.metrics = None if metrics is None else _metric_dict(metrics)
        self.soft_targets = soft_targets
        self._default: dict[str, Any] = {}

    def update(self, outputs: Any, targets: Any) -> None:
        if self.metrics is None:
            pair = _classes_and_targets(outputs, targets, self.soft_targets)
            if pair is None:
                return
            outputs, targets = pair
            if "accuracy" not in self._default:
                from torchmetrics.classification import MulticlassAccuracy

                self._default["accuracy"] = MulticlassAccuracy(
                    num_classes=outputs.shape[1], average="micro"
                )
        for metric in (self.metrics or self._default).values():
            if metric.device != outputs.device:
                metric.to(outputs.device)
            metric.update(outputs, targets)

    def compute(self) -> dict[str, float]:
        """The metrics over every batch since the last compute, then a fresh start."""
        results: dict[str, float] = {}
        metrics = self.metrics if self.metrics is not None else self._default
        try:
            for name, metric in metrics.items():
                if metric.update_count == 0:  # nothing evaluated: no value rather than a warning
                    continue
                _flatten(name, metric.compute(), results)
        finally:
            for metric in metrics.values():
                metric.reset()
        return results


def _flatten(name: str, value: Any, into: dict[str, float]) -> None:
    """Scalars as they are; a per-class tensor as ``name/0``, ``name/1``...; a dict as
    ``name/key`` (metrics log as plain floats)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{name}/{key}", item, into)
    elif isinstance(value, torch.Tensor) and value.numel() != 1:
        for i, item in enumerate(value.flatten().tolist()):
            into[f"{name}/{i}"] = float(item)
    else:
        into[name] = float(value)


# -- models -----------------------------------------------------------------------------------


def _rows(batch: Batch) -> int:
    return int(next(iter(batch.values())).shape[0])


def _need_keys(batch: Batch, keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise _error(
            f"train_dataloader/eval_dataloader: {what} needs batch key(s) "
            f"{', '.join(map(repr, missing))}; the batch has {sorted(batch)}. Yield "
            f"({keys[0]}, {keys[-1]}) tuples or dicts with these keys"
        )


class ModuleModel(Model):
    """Any ``nn.Module`` behind the :class:`Model` interface.

    ``forward`` calls the module on ``batch["inputs"]``; the loss is
    ``loss_fn(outputs, batch["targets"])``, cross-entropy when ``loss_fn`` is None (class
    indices or class probabilities, so label smoothing and mixing work). ``kind`` (for which
    algorithms apply) is inferred like :class:`~speedup.model.Classifier`'s: ``cnn``
    with a convolution, ``mlp`` with only linear layers, else ``generic``. Evaluation reports
    the loss and ``metrics`` (:class:`EvalMetrics`: accuracy for classification by default).
    """

    tuple_keys = TUPLE_KEYS

    def __init__(
        self,
        net: nn.Module,
        loss_fn: LossFn | None = None,
        kind: str | None = None,
        metrics: Any = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.kind = kind or infer_kind(net)
        # A plain attribute, not a submodule: metric state stays out of state_dict, the
        # checkpoint and the modules that algorithms walk.
        self.eval_metrics = EvalMetrics(metrics, soft_targets=loss_fn is None)

    def set_metrics(self, metrics: Any) -> None:
        self.eval_metrics = EvalMetrics(metrics, soft_targets=self.loss_fn is None)

    def forward(self, batch: Batch) -> Any:
        if "inputs" not in batch:
            _need_keys(batch, TUPLE_KEYS, "a plain module")
        return self.net(batch["inputs"])

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        if "targets" not in batch:
            _need_keys(batch, TUPLE_KEYS, "the loss of a plain module")
        if self.loss_fn is None:
            return soft_cross_entropy(outputs, batch["targets"])
        loss = self.loss_fn(outputs, batch["targets"])
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else _type_name(loss)
            raise _error(
                f"loss_fn: returned {shape}; it must return the batch's mean loss as a scalar "
                "tensor (reduction='mean')"
            )
        return loss

    def per_sample_loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """``[N]``: each sample's loss. Cross-entropy is computed unreduced; a ``loss_fn`` is
        called on each sample alone (its mean over a batch of one is that sample's loss)."""
        targets = batch["targets"]
        if self.loss_fn is None:
            if targets.dtype.is_floating_point and targets.shape == outputs.shape:
                losses = -(targets * F.log_softmax(outputs.float(), dim=1)).sum(1)
            else:
                losses = F.cross_entropy(outputs.float(), targets, reduction="none")
            return losses.flatten(1).mean(1) if losses.dim() > 1 else losses
        return torch.stack(
            [
                self.loss_fn(outputs[i : i + 1], targets[i : i + 1]).float()
                for i in range(len(targets))
            ]
        )

    def metrics(self, outputs: Any, batch: Batch) -> dict[str, tuple[Any, int]]:
        n = _rows(batch)
        loss = self.loss(outputs, batch).detach().float()
        self.eval_metrics.update(outputs, batch["targets"])
        return {"loss": (loss * n, n)}

    def finalize_metrics(self, averages: dict[str, float]) -> dict[str, float]:
        return {**averages, **self.eval_metrics.compute()}


def _is_hf_model(net: nn.Module) -> bool:
    # Whoever built a transformers model has imported transformers: no import needed here.
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(net, transformers.PreTrainedModel)


def hf_task(net: nn.Module) -> str | None:
    """``clm``, ``mlm`` or ``classification`` when ``net`` is the transformers auto class of
    that task for its architecture (so speedup computes the loss from the logits, as the model
    would, and algorithms may rewrite the labels before it); None for any other model, whose
    own ``.loss`` is used."""
    from transformers.models.auto import modeling_auto as auto

    config = net.config
    if getattr(config, "is_encoder_decoder", False):
        return None
    tables = (
        ("clm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        ("mlm", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
        ("classification", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
    )
    name = type(net).__name__
    for task, table in tables:
        names = table.get(getattr(config, "model_type", None), ())
        if name in ((names,) if isinstance(names, str) else tuple(names)):
            single_label = (None, "single_label_classification")
            if task == "classification" and (
                config.num_labels == 1 or config.problem_type not in single_label
            ):
                return None  # regression or multi-label: the model's own loss knows which
            return task
    return None


class HFTaskModel(HFModel):
    """A Hugging Face model of a known task (:func:`hf_task`) through the recipes' own
    :class:`~speedup.model.HFModel`, which also feeds ``metrics`` with the logits
    and labels its loss scores (for language models: the positions that carry a loss)."""

    tuple_keys = ("input_ids", "labels")

    def __init__(self, net: nn.Module, task: str, metrics: Any = None) -> None:
        super().__init__(net, task, kind=str(getattr(net.config, "model_type", "hf")))
        self.eval_metrics = EvalMetrics(metrics) if metrics is not None else None

    def set_metrics(self, metrics: Any) -> None:
        self.eval_metrics = EvalMetrics(metrics)

    def forward(self, batch: Batch) -> torch.Tensor:
        _need_keys(batch, self.tuple_keys, type(self.net).__name__)
        return super().forward(batch)

    def metrics(self, outputs: torch.Tensor, batch: Batch) -> dict[str, tuple[Any, Any]]:
        if self.eval_metrics is not None:
            if self.task == "classification":
                self.eval_metrics.update(outputs, batch["labels"].long())
            else:
                logits, labels = self._token_targets(outputs, batch)
                counted = labels != -100
                self.eval_metrics.update(logits[counted], labels[counted].long())
        return super().metrics(outputs, batch)

    def finalize_metrics(self, averages: dict[str, float]) -> dict[str, float]:
        finished = super().finalize_metrics(averages)
        if self.eval_metrics is None:
            return finished
        return {**finished, **self.eval_metrics.compute()}


class HFLossModel(Model):
    """A Hugging Face model whose task speedup does not know: the batch goes to the model as
    keyword arguments (labels included) and the model's own ``.loss`` is the loss.

    The loss is computed in ``forward`` here, so an algorithm that rewrites the labels at
    BEFORE_LOSS does not change it; models of the known tasks (:func:`hf_task`) have no such
    limit."""

    tuple_keys = ("input_ids", "labels")

    def __init__(self, net: nn.Module, metrics: Any = None) -> None:
        super().__init__()
        self.net = net
        self.kind = str(getattr(net.config, "model_type", "hf"))
        self.eval_metrics = EvalMetrics(metrics) if metrics is not None else None

    def set_metrics(self, metrics: Any) -> None:
        self.eval_metrics = EvalMetrics(metrics)

    def forward(self, batch: Batch) -> Any:
        return self.net(**batch)

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise _error(
                f"model: {type(self.net).__name__} returned no .loss; its batches need the "
                f"labels it trains on (the batch has {sorted(batch)})"
            )
        return loss

    def metrics(self, outputs: Any, batch: Batch) -> dict[str, tuple[Any, int]]:
        n = _rows(batch)
        if self.eval_metrics is not None:
            self.eval_metrics.update(outputs.logits, batch.get("labels"))
        return {"loss": (self.loss(outputs, batch).detach().float() * n, n)}

    def finalize_metrics(self, averages: dict[str, float]) -> dict[str, float]:
        if self.eval_metrics is None:
            return averages
        return {**averages, **self.eval_metrics.compute()}


def as_model(model: Any, loss_fn: LossFn | None = None, metrics: Any = None) -> Model:
    """A speedup :class:`Model` for ``model``: a Model as it is, a Hugging Face model through
    :func:`hf_task`, any other ``nn.Module`` as a :class:`ModuleModel`."""
    if loss_fn is not None and not callable(loss_fn):
        raise _error(
            f"loss_fn: expected a callable (outputs, targets) -> loss, got {_type_name(loss_fn)}"
        )
    if isinstance(model, Model):
        if loss_fn is not None:
            raise _error(
                f"loss_fn: {type(model).__name__} is a speedup Model, which defines its own "
                "loss(); pass loss_fn with a plain nn.Module"
            )
        if metrics is not None:
            if not hasattr(model, "set_metrics"):
                raise _error(
                    f"metrics: {type(model).__name__} is a speedup Model, which reports its own "
                    "metrics (Model.metrics); pass metrics with a plain nn.Module or a Hugging "
                    "Face model (for a Classifier: its .net)"
                )
            model.set_metrics(metrics)
        return model
    if not isinstance(model, nn.Module):
        raise _error(
            "model: expected a torch nn.Module (with loss_fn=, or a Hugging Face model) or a "
            f"speedup Model; got {_type_name(model)}"
        )
    if _is_hf_model(model):
        if loss_fn is not None:
            raise _error(
                f"loss_fn: {type(model).__name__} is a Hugging Face model, which computes its "
                "own loss from the batch's labels; leave loss_fn out"
            )
        task = hf_task(model)
        return HFLossModel(model, metrics) if task is None else HFTaskModel(model, task, metrics)
    return ModuleModel(model, loss_fn, metrics=metrics)


# -- dataloaders ------------------------------------------------------------------------------


def as_batch(
    batch: Any, keys: Sequence[str] = TUPLE_KEYS, where: str = "train_dataloader"
) -> Batch:
    """One batch as the dict of tensors the trainer and algorithms use: an ``(inputs, targets)``
    tuple or list becomes ``{keys[0]: inputs, keys[1]: targets}``; any mapping (a Hugging Face
    ``BatchEncoding``) becomes a plain dict."""
    if isinstance(batch, Mapping):
        out = batch if type(batch) is dict else dict(batch)
    elif isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise _error(
                f"{where}: a tuple batch must be ({keys[0]}, {keys[1]}), got {len(batch)} items; "
                f"yield dicts of tensors for other layouts"
            )
        out = {keys[0]: batch[0], keys[1]: batch[1]}
    else:
        raise _error(
            f"{where}: a batch must be an ({keys[0]}, {keys[1]}) tuple or a dict of tensors, "
            f"got {_type_name(batch)}"
        )
    for key, value in out.items():
        if not isinstance(value, torch.Tensor):
            raise _error(
                f"{where}: batch key {key!r} holds a {_type_name(value)}, not a tensor; collate "
                "it into a tensor or drop it (for a datasets.Dataset: "
                "dataset.with_format('torch', columns=[...]))"
            )
    return out


class DictBatchLoader:
    """A dataloader whose batches come out as dicts (see :func:`as_batch`).

    Every other attribute is the loader's own: ``len``, ``batch_size``, ``dataset``,
    ``sampler``, and ``set_epoch``/``start_at`` exactly when the loader has them, so the
    trainer's epoch seeding and sample-exact resume see the loader as it is."""

    def __init__(self, loader: Any, keys: Sequence[str] = TUPLE_KEYS, where: str = "") -> None:
        self.loader = loader
        self.keys = tuple(keys)
        self.where = where

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield as_batch(batch, self.keys, self.where)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "keys", "where"):  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __repr__(self) -> str:
        return f"DictBatchLoader({self.loader!r})"


def _yields_dicts(loader: Any) -> bool:
    """speedup's own loaders, whose batches are dicts of tensors by construction."""
    loaders = sys.modules.get("speedup.data.loaders")
    return loaders is not None and isinstance(
        loader, (loaders.TensorBatchLoader, loaders.ResumableDataLoader)
    )


def as_loader(
    loader: Any, keys: Sequence[str] = TUPLE_KEYS, where: str = "train_dataloader"
) -> Any:
    """``loader`` checked, and wrapped in a :class:`DictBatchLoader` unless it is one of
    speedup's own (which yield dicts already)."""
    if loader is None:
        raise _error(f"{where}: required (a DataLoader or any iterable of batches with a len)")
    module = type(loader).__module__ or ""
    fix = "wrap it in torch.utils.data.DataLoader(dataset, batch_size=..., shuffle=True)"
    if module.split(".")[0] == "datasets":
        raise _error(
            f"{where}: got a Hugging Face {type(loader).__name__}, not a dataloader; {fix} "
            "after dataset.with_format('torch')"
        )
    if isinstance(loader, torch.utils.data.Dataset) and not isinstance(
        loader, torch.utils.data.DataLoader
    ):
        raise _error(f"{where}: got a {type(loader).__name__} dataset, not a dataloader; {fix}")
    if isinstance(loader, (Mapping, torch.Tensor)):
        raise _error(
            f"{where}: got a {_type_name(loader)}, not a dataloader; for tensors in memory use "
            "speedup.data.TensorBatchLoader({'inputs': x, 'targets': y}, batch_size) or a "
            "torch DataLoader over a TensorDataset"
        )
    if not isinstance(loader, Iterable):
        raise _error(
            f"{where}: expected a DataLoader (an iterable of batches), got {_type_name(loader)}"
        )
    try:
        length = len(loader)
    except TypeError:
        raise _error(
            f"{where}: {type(loader).__name__} has no len(); the trainer needs the number of "
            "batches per epoch (durations in epochs, schedules, resume): give the dataset a "
            "__len__, or use a map-style Dataset"
        ) from None
    if where == "train_dataloader" and length == 0:
        raise _error(
            f"{where}: has no batches (len 0); is the dataset smaller than one batch with "
            "drop_last=True?"
        )
    return loader if _yields_dicts(loader) else DictBatchLoader(loader, keys, where)


# -- algorithms -------------------------------------------------------------------------------


def _build_algorithm(name: Any, args: Any, where: str) -> Algorithm:
    from speedup.algorithm import ALGORITHMS, build_algorithm
    from speedup.arguments import check_arguments

    if not isinstance(name, str):
        raise _error(f"{where}: an algorithm name must be a string, got {_type_name(name)}")
    try:
        cls = ALGORITHMS.get(name)
    except UnknownNameError as err:
        raise _error(f"{where}: {err}") from None
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise _error(
            f"{where}: the arguments of {name!r} must be a dict of keyword arguments, got "
            f"{_type_name(args)} (e.g. {{{name!r}: {{...}}}})"
        )
    args = dict(args)
    check_arguments(cls, args, f"algorithms.{name}", "Trainer(algorithms=...)")
    return build_algorithm(name, args)


def as_algorithms(algorithms: Any) -> list[Algorithm]:
    """Algorithm instances from instances, registry names (``"label_smoothing"``) and
    ``{name: kwargs}`` mappings, alone or in a list; a whole mapping ``{name: kwargs, ...}``
    is taken in its order, as a recipe's ``algorithms:`` section is."""
    if algorithms is None:
        return []
    if isinstance(algorithms, (str, Algorithm)):
        algorithms = [algorithms]
    elif isinstance(algorithms, Mapping):
        algorithms = [{name: args} for name, args in algorithms.items()]
    elif not isinstance(algorithms, Iterable):
        raise _error(
            "algorithms: expected a list of algorithms (instances, names or {name: kwargs}), "
            f"got {_type_name(algorithms)}"
        )
    built: list[Algorithm] = []
    for i, item in enumerate(algorithms):
        where = f"algorithms[{i}]"
        if isinstance(item, Algorithm):
            built.append(item)
        elif isinstance(item, str):
            built.append(_build_algorithm(item, None, where))
        elif isinstance(item, Mapping):
            if len(item) != 1:
                raise _error(
                    f"{where}: a mapping names one algorithm, {{name: kwargs}}; got "
                    f"{len(item)} keys ({', '.join(map(str, item))}): list them separately"
                )
            ((name, args),) = item.items()
            built.append(_build_algorithm(name, args, where))
        elif isinstance(item, type) and issubclass(item, Algorithm):
            name = item.__name__
            raise _error(f"{where}: {name} is a class; pass an instance, {name}()")
        else:
            raise _error(
                f"{where}: expected an Algorithm, a registered name or {{name: kwargs}}, got "
                f"{_type_name(item)}"
            )
    return built


# -- all together -----------------------------------------------------------------------------


class AdaptedInputs(NamedTuple):
    model: Model
    train_dataloader: Any
    eval_dataloader: Any
    algorithms: list[Algorithm]


def adapt_inputs(
    model: Any,
    train_dataloader: Any,
    eval_dataloader: Any = None,
    algorithms: Any = (),
    loss_fn: LossFn | None = None,
    metrics: Any = None,
) -> AdaptedInputs:
    """The Trainer's inputs in the forms it drives (see the module docstring); bad input is a
    ConfigError naming the argument and what it accepts."""
    adapted = as_model(model, loss_fn, metrics)
    keys = getattr(adapted, "tuple_keys", None)
    if keys is None:  # a speedup Model: the recipes' language models take the HF keys
        keys = ("input_ids", "labels") if isinstance(adapted, HFModel) else TUPLE_KEYS
    train = as_loader(train_dataloader, keys, "train_dataloader")
    evaluation = None
    if eval_dataloader is not None:
        evaluation = as_loader(eval_dataloader, keys, "eval_dataloader")
    return AdaptedInputs(adapted, train, evaluation, as_algorithms(algorithms))
