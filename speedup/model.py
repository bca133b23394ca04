"""The model protocol the Trainer drives, and its adapters for classifiers and HF models.

:class:`Model` is what the core trains: ``forward(batch)``, ``loss``, ``metrics`` that
accumulate across batches and ranks. :class:`Classifier` wraps any network mapping
``batch["inputs"]`` to logits; :class:`HFModel` any ``transformers`` model. They live in the
core (not in ``speedup.models``, the registry of built-in networks) because the trainer, the
user-model adapters and the algorithms depend on them, and the core depends on no workload.
:class:`ResidualBlock` is the public shape of a residual block, for algorithms that act on
residual structure (stochastic depth) without knowing the model that holds it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Classifier",
    "HFModel",
    "Model",
    "ResidualBlock",
    "infer_kind",
    "soft_cross_entropy",
]

Batch = dict[str, torch.Tensor]
Metrics = dict[str, tuple[torch.Tensor, int]]
_TASKS = ("clm", "mlm", "classification")


class Model(nn.Module):
    """A network plus its loss and metrics.

    ``kind`` names the model family (``"vision"``, ``"lm"``, ...) for algorithm applicability.
    ``forward(batch)`` takes the batch dict; ``loss(outputs, batch)`` returns a scalar mean
    loss; ``metrics(outputs, batch)`` returns ``{name: (sum, count)}`` so that evaluation can
    accumulate across batches (and ranks) without a sync per batch.
    """

    kind: str = "generic"

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        raise NotImplementedError

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, outputs: Any, batch: dict[str, torch.Tensor]) -> Metrics:
        return {"loss": (self.loss(outputs, batch).detach() * _rows(batch), _rows(batch))}

    def eval_forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self(batch)

    def per_sample_loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of each sample, ``[N]``, unreduced (data selection ranks samples by it).

        Models that implement it take part in loss-based selection (SelectiveBackprop); the
        mean of a classifier's per-sample losses equals :meth:`loss`."""
        raise NotImplementedError(f"{type(self).__name__} does not define per_sample_loss")

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int | torch.Tensor:
        """How many elements ``loss`` averages over in ``batch`` (samples here; label tokens
        for language models). Gradient accumulation weights each microbatch's mean loss by
        its share of the batch's total, so accumulated gradients equal the full batch's."""
        return _rows(batch)

    def finalize_metrics(self, averages: dict[str, float]) -> dict[str, float]:
        """Metrics derived from the accumulated averages (e.g. perplexity from loss)."""
        return averages


def _rows(batch: dict[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


def infer_kind(net: nn.Module) -> str:
    """``cnn`` if the net convolves, ``mlp`` if it is only linear layers, else ``generic``."""
    modules = list(net.modules())
    if any(isinstance(m, nn.modules.conv._ConvNd) for m in modules):
        return "cnn"
    if any(isinstance(m, nn.Linear) for m in modules):
        return "mlp"
    return "generic"


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy that takes class indices or per-class probabilities (smoothed or mixed).

    Classes are on dim 1, as in ``F.cross_entropy``: ``[N, K]`` and, for dense prediction,
    ``[N, K, H, W]`` logits with targets of the same shape."""
    if targets.dtype.is_floating_point and targets.shape == logits.shape:
        return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()
    return F.cross_entropy(logits.float(), targets)


class Classifier(Model):
    """Wraps any ``nn.Module`` mapping ``batch["inputs"]`` to class logits."""

    def __init__(self, net: nn.Module, num_classes: int, kind: str | None = None) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.kind = kind or infer_kind(net)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["inputs"])

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return soft_cross_entropy(outputs, batch["targets"])

    def per_sample_loss(
        self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        targets = batch["targets"]
        if targets.dtype.is_floating_point and targets.shape == outputs.shape:
            losses = -(targets * F.log_softmax(outputs.float(), dim=1)).sum(1)
        else:
            losses = F.cross_entropy(outputs.float(), targets, reduction="none")
        return losses.flatten(1).mean(1) if losses.dim() > 1 else losses  # [N]: one per sample

    def metrics(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> Metrics:
        targets = batch["targets"]
        if targets.dtype.is_floating_point:
            targets = targets.argmax(-1)
        n = int(targets.shape[0])
        loss_sum = F.cross_entropy(outputs.float(), targets, reduction="sum")
        metrics = {"loss": (loss_sum.detach(), n)}
        k = min(5, outputs.shape[-1])
        top = outputs.topk(k, dim=-1).indices
        hits = top == targets.unsqueeze(-1)
        metrics["accuracy"] = (hits[:, 0].sum().float(), n)
        if self.num_classes > 10:  # top-5 says little with ten classes or fewer
            metrics["top5_accuracy"] = (hits.any(-1).sum().float(), n)
        return metrics


class HFModel(Model):
    """A ``transformers`` model with the loss, metrics and loss weight of its task.

    ``task`` is ``clm`` (causal LM: position t predicts label t+1), ``mlm`` (masked LM: labels
    are -100 except at masked positions) or ``classification`` (``batch["labels"]`` holds one
    class id per sequence, or class probabilities). Losses are means over the label tokens
    that count; :meth:`loss_weight` returns that count, so gradient accumulation weights each
    microbatch by its label tokens and reproduces the full batch's gradient.
    """

    def __init__(self, net: nn.Module, task: str, kind: str) -> None:
        super().__init__()
        if task not in _TASKS:
            raise ValueError(f"task {task!r}: allowed {', '.join(_TASKS)}")
        self.net = net
        self.task = task
        self.kind = kind

    def forward(self, batch: Batch) -> torch.Tensor:
        extra: dict[str, Any] = {"use_cache": False} if self.task == "clm" else {}
        out = self.net(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **extra
        )
        return out.logits

    def _token_targets(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, ...]:
        """``[N, V]`` logits and ``[N]`` labels of the positions that may carry a loss."""
        labels = batch["labels"]
        if self.task == "clm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.task == "classification":
            labels = batch["labels"]
            return soft_cross_entropy(
                outputs, labels if labels.is_floating_point() else labels.long()
            )
        logits, labels = self._token_targets(outputs, batch)
        # A sum over counted tokens divided by their number: 0 (not NaN) with no labels.
        total = F.cross_entropy(logits, labels.long(), ignore_index=-100, reduction="sum")
        return total / (labels != -100).sum().clamp(min=1)

    def per_sample_loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``[N]``: each sequence's mean loss over its own label tokens (0 where it has none);
        for classification, each sequence's cross-entropy."""
        if self.task == "classification":
            labels = batch["labels"]
            if labels.is_floating_point() and labels.shape == outputs.shape:
                return -(labels * F.log_softmax(outputs.float(), dim=-1)).sum(-1)
            return F.cross_entropy(outputs.float(), labels.long(), reduction="none")
        labels = batch["labels"]
        if self.task == "clm":
            outputs, labels = outputs[:, :-1], labels[:, 1:]
        labels = labels.long()
        token = F.cross_entropy(
            outputs.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        counted = (labels != -100).sum(1).clamp(min=1)
        return token.sum(1) / counted

    def loss_weight(self, batch: Batch) -> int | torch.Tensor:
        if self.task == "classification":
            return int(batch["labels"].shape[0])
        labels = batch["labels"][:, 1:] if self.task == "clm" else batch["labels"]
        return (labels != -100).sum()

    def metrics(self, outputs: torch.Tensor, batch: Batch) -> dict[str, tuple[Any, Any]]:
        # Counts stay tensors: the trainer sums them across batches without a device sync.
        if self.task == "classification":
            targets = batch["labels"]
            if targets.dtype.is_floating_point:
                targets = targets.argmax(-1)
            rows = int(targets.shape[0])
            loss_sum = F.cross_entropy(outputs.float(), targets.long(), reduction="sum")
            hits = (outputs.argmax(-1) == targets).sum().float()
            return {"loss": (loss_sum.detach(), rows), "accuracy": (hits, rows)}
        logits, labels = self._token_targets(outputs, batch)
        labels = labels.long()
        counted = labels != -100
        n = counted.sum()
        loss_sum = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").float()
        hits = ((logits.argmax(-1) == labels) & counted).sum().float()
        name = "masked_accuracy" if self.task == "mlm" else "accuracy"
        return {"loss": (loss_sum.detach(), n), name: (hits, n)}

    def finalize_metrics(self, averages: dict[str, float]) -> dict[str, float]:
        if self.task != "classification" and "loss" in averages:
            return {**averages, "perplexity": math.exp(min(averages["loss"], 700.0))}
        return averages


class ResidualBlock(nn.Module):
    """A residual block ``relu(branch(x) + shortcut(x))`` (He et al. 2016, eq. 1, with the
    ReLU after the addition of their Figure 2).

    ``branch`` is the residual function, ``shortcut`` the identity or projection path. Model
    code subclasses it so that an algorithm can find residual blocks and rebuild one from its
    parts: :class:`~speedup.algorithms.stochastic_depth.StochasticBlock` adopts the block's
    submodules and public attributes under the same names and calls the block class's own
    ``branch`` and ``shortcut`` on them, so both may use only those (no private attributes)."""

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))
