"""Gradient clipping: by global norm, by value, or adaptively per unit (AGC).

**What.** Bounds the gradient before the optimizer step, in one of three ways:

* ``norm``: if the global L2 norm ``||g||`` of all gradients exceeds ``c``, scale every
  gradient by ``c / ||g||`` (Pascanu et al. 2013, "On the difficulty of training recurrent
  neural networks", algorithm 1); ``torch.nn.utils.clip_grad_norm_``.
* ``value``: clamp every gradient entry to ``[-c, c]`` (element-wise clipping, which
  Pascanu et al. discuss as Mikolov's 2012 heuristic); ``torch.nn.utils.clip_grad_value_``.
* ``adaptive`` (AGC, Brock et al. 2021, "High-performance large-scale image recognition
  without normalization", section 4.1, eq. 3): per *unit* ``i`` (one output row of a weight:
  a neuron, a filter; the whole tensor for biases and gains), if
  ``||G_i|| / max(||W_i||, eps) > c`` then ``G_i <- c * max(||W_i||, eps) / ||G_i|| * G_i``,
  with ``eps = 1e-3``. The bound is relative to the weight's own size, so one threshold fits
  layers of any scale.

Default thresholds (``clipping_threshold=None``): 1.0 for ``norm`` (BERT, GPT-2 and most
transformer recipes clip the global norm at 1.0), 1.0 for ``value``, and 0.01 for ``adaptive``
(Brock et al.'s NFNet setting at batch size 4096; they find that larger batches need smaller
thresholds, section 4.1).

**When it helps.** Stability, not speed: RNNs and transformers with occasional gradient
spikes (loss spikes with large learning rates or batch sizes), and AGC makes normalizer-free
ResNets trainable at batch 4096 with strong augmentation (Brock et al., figure 3). Composer's
method card gives no speed or accuracy figure; expect an unchanged loss curve when gradients
are tame, fewer divergent runs when they are not. Cost: one fused norm over the gradients
per step (plus the weights' norms for AGC).

**Composes badly with.** SAM if clipping ran first (SAM must see the raw gradient and its
second gradient must be clipped): declared ``runs_after`` SAM, so clipping acts on the
gradient the optimizer receives. With an fp16 GradScaler the trainer unscales before this
event, so thresholds are in true gradient units. Brock et al. do not clip the final linear
classifier with AGC; pass ``exclude`` patterns to do the same.

Functional twins: :func:`apply_gradient_clipping`, :func:`adaptive_clip_grad_`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "CLIPPING_TYPES",
    "DEFAULT_THRESHOLDS",
    "GradientClipping",
    "adaptive_clip_grad_",
    "apply_gradient_clipping",
    "unitwise_norm",
]

CLIPPING_TYPES = ("norm", "value", "adaptive")
#: The threshold each mode uses when none is given (see the module docstring for sources).
DEFAULT_THRESHOLDS = {"norm": 1.0, "value": 1.0, "adaptive": 0.01}


def unitwise_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output unit (row 0 indexes units: ``[out, ...]`` weights), broadcastable
    to ``tensor``; scalars and vectors (biases, norm gains) are one unit."""
    if tensor.dim() <= 1:
        return tensor.norm(2)
    return tensor.norm(2, dim=tuple(range(1, tensor.dim())), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: Iterable[torch.Tensor], clipping_threshold: float = 0.01, eps: float = 1e-3
) -> None:
    """Adaptive gradient clipping (Brock et al. 2021, eq. 3), in place on ``p.grad``.

    Each unit's gradient is rescaled to at most ``clipping_threshold * max(||W_i||, eps)``;
    units under the bound are left exactly as they were.
    """
    if clipping_threshold <= 0:
        raise ValueError(f"clipping_threshold must be > 0, got {clipping_threshold}")
    for p in parameters:
        grad = p.grad
        if grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp_(min=eps).mul_(clipping_threshold)
        grad_norm = unitwise_norm(grad)
        # Units over the bound shrink to it; the others keep a factor of exactly 1.
        tiny = torch.finfo(grad_norm.dtype).tiny
        factor = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=tiny), 1.0)
        grad.mul_(factor.to(grad.dtype))


def apply_gradient_clipping(
    parameters: Iterable[torch.Tensor] | nn.Module,
    clipping_type: str = "norm",
    clipping_threshold: float | None = None,
) -> torch.Tensor | None:
    """Clip the gradients of ``parameters`` (or a module's) in place, before ``optimizer.step``.

    Returns the total gradient norm before clipping for ``norm`` (as
    ``clip_grad_norm_`` does), else None. ``clipping_threshold`` None uses
    :data:`DEFAULT_THRESHOLDS`.
    """
    if clipping_type not in CLIPPING_TYPES:
        raise ValueError(
            f"clipping_type must be one of {', '.join(CLIPPING_TYPES)}, got {clipping_type!r}"
        )
    threshold = (
        DEFAULT_THRESHOLDS[clipping_type] if clipping_threshold is None else clipping_threshold
    )
    if threshold <= 0:
        raise ValueError(f"clipping_threshold must be > 0, got {threshold}")
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return None
    if clipping_type == "norm":
        return torch.nn.utils.clip_grad_norm_(params, threshold)
    if clipping_type == "value":
        torch.nn.utils.clip_grad_value_(params, threshold)
        return None
    adaptive_clip_grad_(params, threshold)
    return None


class GradientClipping(Algorithm):
    """Clip gradients (global norm, value, or adaptive per unit) before each optimizer step."""

    name = "gradient_clipping"

    def __init__(
        self,
        clipping_type: str = "norm",
        clipping_threshold: float | None = None,
        exclude: list[str] = (),  # noqa: B006 - an immutable default
    ) -> None:
        if clipping_type not in CLIPPING_TYPES:
            raise ValueError(
                f"gradient_clipping.clipping_type must be one of {', '.join(CLIPPING_TYPES)}, "
                f"got {clipping_type!r}"
            )
        if clipping_threshold is not None and not clipping_threshold > 0:
            raise ValueError(
                f"gradient_clipping.clipping_threshold must be > 0, got {clipping_threshold}"
            )
        self.clipping_type = clipping_type
        self.clipping_threshold = (
            DEFAULT_THRESHOLDS[clipping_type] if clipping_threshold is None else clipping_threshold
        )
        #: fnmatch patterns of parameter names left unclipped (e.g. ``["net.fc.*"]``).
        self.exclude = list(exclude)
        self._params: list[torch.Tensor] | None = None
        self._model: nn.Module | None = None

    def declare(self) -> Declaration:
        reads = {"model.grads"}
        if self.clipping_type == "adaptive":  # the bound is relative to the weights
            reads.add("model.weights")
        return Declaration(
            events={Event.AFTER_TRAIN_BATCH: Access(reads=reads, writes={"model.grads"})},
            runs_after={"sam"},  # clip the gradient the optimizer will use, SAM's second one
        )

    def _parameters(self, model: nn.Module) -> list[torch.Tensor]:
        if self._params is None or self._model is not model:  # bound once per model
            self._model = model
            self._params = [
                p
                for name, p in model.named_parameters()
                if not any(fnmatch.fnmatch(name, pattern) for pattern in self.exclude)
            ]
        return self._params

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        params = self._parameters(state.model)
        apply_gradient_clipping(params, self.clipping_type, self.clipping_threshold)
