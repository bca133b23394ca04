"""The model interface the Trainer drives, and an adapter for any classifier network."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Model", "Classifier", "soft_cross_entropy"]

Metrics = dict[str, tuple[torch.Tensor, int]]


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


def _rows(batch: dict[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy that takes class indices or per-class probabilities (smoothed or mixed)."""
    if targets.dtype.is_floating_point and targets.shape == logits.shape:
        return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits.float(), targets)


class Classifier(Model):
    """Wraps any ``nn.Module`` mapping ``batch["inputs"]`` to class logits."""

    def __init__(self, net: nn.Module, num_classes: int, kind: str = "vision") -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.kind = kind

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["inputs"])

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return soft_cross_entropy(outputs, batch["targets"])

    def metrics(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> Metrics:
        targets = batch["targets"]
        if targets.dtype.is_floating_point:
            targets = targets.argmax(-1)
        n = int(targets.shape[0])
        loss_sum = F.cross_entropy(outputs.float(), targets, reduction="sum")
        correct = (outputs.argmax(-1) == targets).sum()
        return {"accuracy": (correct.float(), n), "loss": (loss_sum.detach(), n)}
