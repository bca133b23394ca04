"""Sharpness-Aware Minimization (SAM), and its adaptive variant ASAM.

**What.** Minimises the worst loss in a ball around the weights, ``min_w max_{||e|| <= rho}
L(w + e)`` (Foret et al. 2021, "Sharpness-aware minimization for efficiently improving
generalization", ICLR, eq. 1). The inner maximum is taken to first order (their eq. 2):
``e = rho * g / ||g||`` with ``g`` the batch gradient at ``w``; the step then uses the
gradient at the perturbed point, ``g_SAM = grad L(w + e)`` (eq. 3), applied to the
unperturbed ``w``. ``||g||`` is the global L2 norm over all parameters with a gradient.
With ``adaptive=True`` the ball is scaled per weight by ``T_w = |w|`` (ASAM: Kwon et al.
2021, "ASAM: adaptive sharpness-aware minimization for scale-invariant learning of deep
neural networks", ICML): ``e = rho * w^2 * g / ||w * g||`` (elementwise products), which makes
the sharpness measure invariant to rescaling the weights (Kwon et al.'s operator is
``|w| + eta``; this is the common ``eta = 0`` form).

Here, at AFTER_TRAIN_BATCH (the batch gradient is ready, the optimizer has not stepped), SAM
saves the weights, moves them to ``w + e``, recomputes the loss and gradient on the same
microbatches the loss saw (weighted by ``Model.loss_weight`` as the trainer does, so
gradient accumulation gives the full batch's gradient), and restores ``w`` exactly from the
copy (no ``w + e - e`` rounding). The optimizer then steps with ``g_SAM``. ``interval`` makes
every k-th step a SAM step and the others plain ones (Composer's knob; its recipes use 10
(medium) and 5 (hot) for ResNet-50). The second forward leaves BatchNorm running statistics
untouched (they describe the data at ``w``, not at ``w + e``). The reported train loss is the
first pass's, at ``w``.

**When it helps.** Generalisation for a fixed number of epochs: Foret et al. report lower
error on CIFAR-10/100, ImageNet and fine-tuning tasks with ``rho = 0.05`` as the usual choice
(they tune rho over {0.01, 0.02, 0.05, 0.1, 0.2, 0.5}). Each SAM step costs a second forward
and backward (about 2x per step at ``interval=1``). Composer's method card reports that
``interval=10`` gives +0.7 points top-1 on ResNet-50/ImageNet for a 7% throughput cost, and
uses rho 0.5 at interval 10 in its medium ResNet-50 recipe; Composer's older README credited
it with 1.4-1.5x time-to-accuracy. ASAM typically wants a larger rho than SAM (Kwon et al.
tune it separately).

**Composes badly with.** Gradient clipping run before it (SAM must see the raw gradient, and
the gradient it produces is the one to clip): declared ``runs_before`` gradient clipping.
Loss rewrites at AFTER_LOSS (loss interpolation) are not replayed by the second pass, which
recomputes ``Model.loss`` on the microbatch as it was at BEFORE_LOSS (after target rewrites by
label smoothing, MixUp and CutMix: declared ``runs_after`` them). fp16 with a GradScaler is
refused (the scaler cannot unscale a second backward in the same step): use bf16. Dropout
draws new masks in the second pass.

Functional twins: :func:`sam_gradient`, :func:`sam_perturbation`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from speedup import distributed
from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["SAM", "bn_stats_frozen", "sam_gradient", "sam_perturbation"]


@torch.no_grad()
def sam_perturbation(
    params: Iterable[torch.Tensor],
    rho: float = 0.05,
    adaptive: bool = False,
    epsilon: float = 1e-12,
    out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The ascent step ``e`` of SAM for parameters that have a ``.grad`` (others are skipped).

    ``e = rho * g / (||g|| + epsilon)``; with ``adaptive`` (ASAM) ``e = rho * w^2 * g /
    (||w * g|| + epsilon)``. Returns one tensor per parameter with a gradient, in order.
    ``out`` (those parameters' gradient tensors) computes ``e`` in place there, saving memory
    when the gradient is no longer needed.
    """
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not params:
        return []
    weights = [p.detach() for p in params]
    if adaptive:
        scaled = torch._foreach_mul(grads, torch._foreach_abs(weights))
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled)))
        del scaled
    else:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    scale = rho / (norm + epsilon)
    if out is None:
        e = torch._foreach_mul(grads, scale)
    else:
        e = out
        torch._foreach_mul_(e, scale)
    if adaptive:
        torch._foreach_mul_(e, weights)
        torch._foreach_mul_(e, weights)
    return e


def sam_gradient(
    params: Iterable[torch.Tensor],
    closure: Callable[[], Any],
    rho: float = 0.05,
    adaptive: bool = False,
    epsilon: float = 1e-12,
) -> Any:
    """Turn the gradients in ``.grad`` into SAM's: ``grad L(w + e)``, the weights left at ``w``.

    Call after ``loss.backward()`` and before ``optimizer.step()``. ``closure`` recomputes the
    loss on the same batch and calls ``backward`` (it runs with the weights at ``w + e`` and
    the gradients cleared); its return value is returned. Parameters without a gradient
    (frozen, unused) are not perturbed. The weights are restored from a copy, bit-exactly::

        loss = loss_fn(model(x), y)
        loss.backward()
        sam_gradient(model.parameters(), lambda: loss_fn(model(x), y).backward())
        optimizer.step()
    """
    params = [p for p in params if p.grad is not None]
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        # The first gradient is not needed once e is known: compute e in its storage.
        e = sam_perturbation(params, rho, adaptive, epsilon, out=[p.grad for p in params])
        if params:
            torch._foreach_add_([p.detach() for p in params], e)
        for p in params:
            p.grad = None
        del e
    try:
        with torch.enable_grad():
            result = closure()
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
    return result


@contextlib.contextmanager
def bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Forward passes inside leave BatchNorm running statistics (and their batch counters)
    exactly as they were; normalisation still uses the batch statistics in train mode."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, count) in zip(norms, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(count)


def _autocast(state: State) -> contextlib.AbstractContextManager:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(state.precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(state.device.type, dtype=dtype)


class SAM(Algorithm):
    """Sharpness-Aware Minimization: step with the gradient at the worst nearby weights."""

    name = "sam"
    # Foret et al. 2021 (SAM, App. C) grid rho over {0.01, ..., 0.5}; interval > 1 trades
    # sharpness-awareness for speed (Composer's interval).
    SEARCH_SPACE = {
        "rho": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
        "interval": {"type": "categorical", "choices": [1, 2, 5, 10]},
    }

    def __init__(
        self,
        rho: float = 0.05,
        epsilon: float = 1e-12,
        interval: int = 1,
        adaptive: bool = False,
    ) -> None:
        if not rho > 0:
            raise ValueError(f"sam.rho must be > 0, got {rho}")
        if not epsilon > 0:
            raise ValueError(f"sam.epsilon must be > 0, got {epsilon}")
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f"sam.interval must be an integer >= 1, got {interval!r}")
        self.rho = rho
        self.epsilon = epsilon
        self.interval = interval
        self.adaptive = adaptive
        #: Each microbatch of the current step as the loss saw it (SAM steps only).
        self._microbatches: list[dict[str, torch.Tensor]] = []
        self.steps_applied = 0  # SAM steps in this process (for logs and tests, not resume)

    def declare(self) -> Declaration:
        return Declaration(
            events={
                Event.FIT_START: Access(reads={"precision"}),
                Event.BEFORE_LOSS: Access(reads={"batch"}),
                Event.AFTER_TRAIN_BATCH: Access(
                    reads={"batch", "model.weights", "model.grads", "model.mode"},
                    writes={"model.grads"},
                ),
            },
            # See the targets the loss sees (smoothed, mixed) when recording microbatches.
            runs_after={"label_smoothing", "mixup", "cutmix"},
            # Clipping and masking act on the gradient the optimizer receives: SAM's.
            runs_before={"gradient_clipping"},
        )

    def _due(self, state: State) -> bool:
        return state.timestamp.batch % self.interval == 0

    def match(self, event: Event, state: State) -> bool:
        if event == Event.FIT_START:
            return True
        if event == Event.AFTER_TRAIN_BATCH:
            return bool(self._microbatches)
        return self._due(state)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._microbatches = []
            if state.scaler is not None:
                raise ConfigError(
                    "algorithms.sam: fp16 with a GradScaler is not supported (the scaler "
                    "unscales one backward per step; SAM does two): use precision bf16"
                )
        elif event == Event.BEFORE_LOSS:
            self._microbatches.append(dict(state.batch))  # new dict, same tensors
        else:
            microbatches, self._microbatches = self._microbatches, []
            self._second_pass(state, microbatches)

    def _second_pass(self, state: State, microbatches: list[dict[str, torch.Tensor]]) -> None:
        model = state.model
        total = sum(model.loss_weight(mb) for mb in microbatches) if len(microbatches) > 1 else None

        def closure() -> None:
            for mb in microbatches:
                with _autocast(state):
                    loss = model.loss(model(mb), mb)
                if total is not None:
                    loss = loss * (model.loss_weight(mb) / total)
                loss.backward()
            # This pass bypasses DDP's hooks: average the perturbed gradients ourselves.
            distributed.average_gradients(model.parameters())

        with bn_stats_frozen(model):
            sam_gradient(model.parameters(), closure, self.rho, self.adaptive, self.epsilon)
        self.steps_applied += 1
