"""Label smoothing.

**What.** Replaces each target distribution ``q`` with ``q' = (1 - alpha) * q + alpha / K``
over ``K`` classes, so the loss stops pushing logits towards infinity (Szegedy et al. 2016,
"Rethinking the Inception architecture", section 7, where ``q`` is the one-hot label and
``u = 1/K`` the uniform prior). ``alpha`` is in ``[0, 1]``; ``alpha = 1`` gives uniform
targets. Whether targets are class indices or class probabilities is decided by shape, as
``F.cross_entropy`` does, never by dtype: targets with as many dims as the logits (class dim
1 of size ``K``) are probabilities (one-hot, multi-hot or soft, of any dtype); targets with
one dim fewer are indices, one-hot encoded along dim 1 (class-first, like the logits:
segmentation targets ``[N, H, W]`` become ``[N, K, H, W]``).

**When it helps.** Classification trained long enough to overfit its confidence. Szegedy et
al. report about 0.2 points absolute on ImageNet top-1 and top-5 error at alpha 0.1; Composer's
method card reports better accuracy on all its image benchmarks at no throughput cost, and
its ResNet-50 recipes use alpha 0.08 (mild) and 0.1 (medium, hot); FFCV's ResNet configs use
0.1. No extra compute.

**Composes badly with.** Knowledge distillation (smoothed teachers distill worse: Müller et al.
2019, section 5). With MixUp/CutMix it composes on soft targets: those write mixed
probabilities first, and smoothing applies on top (declared order).

Functional twin: :func:`smooth_labels`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["LabelSmoothing", "smooth_labels"]


def _check_alpha(alpha: float, key: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{key} must be a number in [0, 1], got {alpha!r}")


def smooth_labels(
    targets: torch.Tensor,
    num_classes: int,
    alpha: float = 0.1,
    binary: bool = False,
    *,
    logits_ndim: int = 2,
) -> torch.Tensor:
    """Smoothed class probabilities ``(1 - alpha) * q + alpha / K``, shaped like the logits.

    ``logits_ndim`` is the number of dims of the logits the targets go with (2 for ``[N, K]``
    classification, 4 for ``[N, K, H, W]`` segmentation). Targets with that many dims are
    probabilities ``q`` with the class dim 1 of size ``num_classes`` (one-hot of any dtype,
    or soft labels from MixUp/CutMix); targets with one dim fewer are class indices, one-hot
    encoded along dim 1. With ``binary=True`` each of the K outputs is its own two-class
    problem (BCE-style losses): every target moves towards 0.5 instead of 1/K; a single
    logit per sample is ``logits_ndim=1`` with targets ``[N]``.
    """
    _check_alpha(alpha, "alpha")
    if logits_ndim >= 2 and targets.dim() == logits_ndim - 1:
        if targets.dtype.is_floating_point:  # F.cross_entropy refuses them too
            raise ValueError(
                f"class-index targets (one dim fewer than the {logits_ndim}-dim logits) must be "
                f"integers, got {targets.dtype}"
            )
        # Class indices: one-hot along the class dim, which is dim 1 like the logits'.
        targets = F.one_hot(targets.long(), num_classes).movedim(-1, 1)
    elif targets.dim() != logits_ndim or (logits_ndim >= 2 and targets.shape[1] != num_classes):
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} fit neither class indices "
            f"({logits_ndim - 1} dims) nor probabilities ({logits_ndim} dims, dim 1 of size "
            f"{num_classes}) for {logits_ndim}-dim logits"
        )
    targets = targets.float()
    spread = 0.5 if binary else 1.0 / num_classes
    return targets * (1.0 - alpha) + alpha * spread


class LabelSmoothing(Algorithm):
    """Smooth the targets for the loss, then restore them, so metrics see the true labels."""

    name = "label_smoothing"
    # Szegedy et al. 2016 (Inception-v3, Sec. 7) used 0.1; Muller et al. 2019 span 0.05-0.2.
    SEARCH_SPACE = {"alpha": {"type": "float", "low": 0.02, "high": 0.2}}

    def __init__(self, alpha: float = 0.1, binary: bool = False) -> None:
        _check_alpha(alpha, "label_smoothing.alpha")
        self.alpha = alpha
        self.binary = binary
        self._original: torch.Tensor | None = None

    def declare(self) -> Declaration:
        return Declaration(
            events={
                Event.BEFORE_LOSS: Access(
                    reads={"batch.targets", "outputs"}, writes={"batch.targets"}
                ),
                Event.AFTER_LOSS: Access(writes={"batch.targets"}),
            },
            runs_after={"mixup", "cutmix"},  # smooth the mixed soft targets they produce
            data_kinds={"image", "signal"},
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        batch = state.batch
        if event == Event.BEFORE_LOSS:
            self._original = batch["targets"]
            outputs = state.outputs
            # The class dim is 1, as for F.cross_entropy ([N, K] or [N, K, H, W] logits); a
            # single binary logit per sample ([N]) has no class dim.
            batch["targets"] = smooth_labels(
                self._original,
                outputs.shape[1] if outputs.dim() >= 2 else 1,
                self.alpha,
                self.binary,
                logits_ndim=outputs.dim(),
            )
        elif self._original is not None:
            batch["targets"] = self._original
            self._original = None
