"""NoOpModel: swap the model for a one-parameter stand-in, to time everything but the model.

**What.** At INIT, ``state.model`` is replaced by :class:`OneParameterModel`: logits of the
shape the real model would produce (``[N, K]`` for classifiers, ``[N, T, V]`` for causal and
masked language models, ``[N, labels]`` for sequence classification), computed as
``w * c`` with one trainable scalar ``w`` (starting at 0, so predictions start uniform) and a
fixed ramp ``c`` over the classes, broadcast over the batch without copying. Loss, loss weight,
metrics and their finalisation are the original model's own methods applied to these outputs,
so the loss path, label handling and evaluation code are the real ones; ``w`` gets a non-zero
gradient and the optimizer takes real (one-element) steps. The original model stays in host
memory, unused, outside the new model (not trained, not moved, not checkpointed).

**When it helps.** Profiling, not training: a run with it measures the data pipeline,
host-to-device copies, the trainer's loop and every non-model algorithm, i.e. the floor under
any step time. If the real run's throughput is close to this one's, the model is not the
bottleneck and model speedups will not show. Composer ships the same idea
(composer/algorithms/no_op_model, "replaces the model with a dummy", no published number:
there is none to publish). Accuracy is meaningless by construction.

**Composes badly with.** Anything that needs the real weights or modules: magnitude pruning
finds no Linear/Conv weight to prune (declared incompatible; rewinding then has nothing to
rewind to and is inert); algorithms that act on the model after INIT (layer freezing, SAM's
extra forward, selective backprop's scoring pass) run but time a one-parameter model. Model
surgery at INIT runs first (declared ``runs_after`` for every surgery algorithm) and is
discarded with the model; it still runs, so INIT-time costs stay in the profile. Models whose
output shape cannot be read from them (neither a classifier with ``num_classes`` nor a Hugging
Face model with a config) are refused at INIT. A model whose ``loss``/``metrics`` use its own
parameters (an auxiliary penalty) would compute them on the unused host copy.

Functional twin: :func:`to_no_op_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from speedup.algorithms._init_order import init_neighbours
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.event import Event
from speedup.model import Model

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["NoOpModel", "OneParameterModel", "output_shape_fn", "to_no_op_model"]

Batch = dict[str, torch.Tensor]
ShapeFn = Callable[[Batch], tuple[int, ...]]

#: Surgery algorithms that act at INIT; the stand-in replaces the model after all of them
#: (it is last in the one total order of INIT surgery, :mod:`._init_order`).
SURGERY = frozenset(init_neighbours("no_op_model")["runs_after"])


def _rows(batch: Batch) -> int:
    return int(next(iter(batch.values())).shape[0])


def output_shape_fn(model: nn.Module) -> tuple[ShapeFn, int]:
    """``(shape_of(batch), classes)``: the logits shape ``model`` produces for a batch, and
    the size of their last dimension.

    Hugging Face models (an ``HFModel``: ``task`` and ``net.config``) give ``[N, T, vocab]``
    for ``clm``/``mlm`` and ``[N, num_labels]`` for ``classification``; any model with an
    integer ``num_classes`` (a ``Classifier``) gives ``[N, num_classes]``. Others raise
    ValueError.
    """
    task = getattr(model, "task", None)
    config = getattr(getattr(model, "net", None), "config", None)
    if task is not None and config is not None:
        if task == "classification":
            labels = int(config.num_labels)
            return (lambda batch: (_rows(batch), labels)), labels
        vocab = int(config.vocab_size)
        return (lambda batch: (*batch["input_ids"].shape[:2], vocab)), vocab
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int) and not isinstance(classes, bool) and classes > 0:
        return (lambda batch: (_rows(batch), classes)), classes
    raise ValueError(
        f"no_op_model: cannot tell the output shape of {type(model).__name__}; supported: "
        "models with an integer num_classes (Classifier) and Hugging Face models (HFModel)"
    )


class OneParameterModel(Model):
    """Logits ``w * ramp`` of the original model's output shape, from one scalar ``w``; loss
    and metrics are the original model's methods. ``forward`` returns a broadcast view (do not
    write into it in place)."""

    def __init__(self, original: Model) -> None:
        super().__init__()
        shape_of, classes = output_shape_fn(original)
        # Kept outside the module tree: no parameters, no device move, no checkpoint.
        self.__dict__["original"] = original
        self._shape_of = shape_of
        self.kind = getattr(original, "kind", "generic")
        self.weight = nn.Parameter(torch.zeros(()))
        self.register_buffer("ramp", torch.linspace(-1.0, 1.0, classes), persistent=False)

    def forward(self, batch: Batch) -> torch.Tensor:
        return (self.weight * self.ramp).expand(self._shape_of(batch))

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        return self.original.loss(outputs, batch)

    def loss_weight(self, batch: Batch) -> int | torch.Tensor:
        return self.original.loss_weight(batch)

    def metrics(self, outputs: Any, batch: Batch) -> dict[str, tuple[Any, Any]]:
        return self.original.metrics(outputs, batch)

    def finalize_metrics(self, averages: dict[str, float]) -> dict[str, float]:
        return self.original.finalize_metrics(averages)


def to_no_op_model(model: Model) -> OneParameterModel:
    """The one-parameter stand-in for ``model`` (which is left as it is)."""
    return OneParameterModel(model)


class NoOpModel(Algorithm):
    """Replace the model with a one-parameter stand-in to profile data and trainer overhead."""

    name = "no_op_model"

    def __init__(self) -> None:
        #: The model the stand-in replaced (set at INIT).
        self.original: Model | None = None

    def declare(self) -> Declaration:
        return Declaration(
            events={
                Event.INIT: Access(
                    reads={"model.modules"}, writes={"model.modules", "model.weights"}
                )
            },
            runs_after=SURGERY,
            # No conv/linear weight is left to prune (and rewinding then has nothing to do).
            incompatible_with={"magnitude_pruning"},
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.original = state.model
        state.model = to_no_op_model(state.model)
        logger.log_metrics({"no_op_model/parameters": 1})
