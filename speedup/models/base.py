"""The model interface the Trainer drives, and an adapter for any classifier network."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Model", "Classifier", "infer_kind", "soft_cross_entropy"]

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
