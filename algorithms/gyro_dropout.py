"""Gyro dropout: train a fixed, pre-selected set of dropout subnetworks.

**What.** Conventional dropout samples a fresh mask for every example of every step, so
almost no subnetwork is ever trained twice. Gyro dropout (Lee et al. 2022, "Gyro dropout:
maximizing ensemble effect in neural network training", MLSys) pre-selects ``sigma`` masks
once and trains only those: each step, ``tau`` of them are active at once, the batch is split
into ``tau`` contiguous groups and group ``j`` is multiplied by mask ``j`` (scaled by
``1 / (1 - p)``); the same ``tau`` stay active for a period of steps before the next ``tau``
take over. As in the authors' code, the default period is ``total_steps * tau / sigma``, so
the ``sigma`` subnetworks share the run equally. Here a subnetwork is one mask index used by
every replaced layer at once (each layer holds its own ``sigma`` masks), so the network trains
exactly ``sigma`` subnetworks; groups of ``tau`` are taken from a random permutation of the
``sigma`` indices (each index once per cycle of ``sigma / tau`` periods, a new permutation per
cycle). The authors' code instead draws each layer's ``tau`` indices independently and with
replacement; the shared permutation guarantees that every pre-selected subnetwork trains, for
equal time. Masks cover the last (feature) dimension and broadcast over any dimensions between
the batch and the features; with microbatches each microbatch is split into the ``tau``
groups. Evaluation is the identity, as with dropout.

**When it helps.** Models that already use dropout on fully connected layers. The paper reports
higher accuracy than conventional dropout in all its experiments, up to 1.93 points (abstract;
seven networks, ten datasets, AlexNet/LeNet/MLP on CIFAR-10/100 among them). Composer ships it
(composer/algorithms/gyro_dropout/README.md, a community contribution) without a measured
number, and recommends ``(sigma, tau) = (256, 16)`` for AlexNet and LeNet and ``(1024, 8)`` for
ResNet-18 and BERT; the defaults here are the paper's code's: ``p=0.5, sigma=256, tau=16``. No
speedup: the cost equals dropout's (the paper's speedup comes from a separate, block-wise
variant not implemented here).

**Composes badly with.** Models without ``nn.Dropout`` (nothing to replace: warned). Dropout
on attention probabilities (Hugging Face ``attn_dropout``) is also replaced, where a feature
mask means a fixed set of key positions; give ``p=None`` to keep each layer's own rate (e.g.
0 for disabled ones). Runs shorter than ``sigma / tau`` steps: the period floors at one step
and part of the pool never trains (lower ``sigma`` or raise ``tau``). NoOpModel replaces the
model afterwards (declared).

Functional twin: :func:`apply_gyro_dropout` (surgery) with :func:`gyro_dropout` (the masking)
and :func:`scheduled_subnetworks` (the schedule).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
from speedup.algorithms._init_order import init_surgery
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.time import Time, TimeUnit

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "GyroDropout",
    "GyroDropoutLayer",
    "apply_gyro_dropout",
    "gyro_dropout",
    "scheduled_subnetworks",
]


def gyro_dropout(x: torch.Tensor, masks: torch.Tensor, p: float) -> torch.Tensor:
    """Apply ``masks`` (``[tau, F]`` bool) to ``x`` (``[N, ..., F]``): rows are split into
    ``tau`` contiguous groups (row ``i`` in group ``i * tau // N``) and group ``j`` keeps the
    features where ``masks[j]`` is True, scaled by ``1 / (1 - p)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if x.dim() < 2 or masks.dim() != 2 or masks.shape[1] != x.shape[-1]:
        raise ValueError(
            f"masks {tuple(masks.shape)} do not fit inputs {tuple(x.shape)}: expected "
            f"[tau, {x.shape[-1] if x.dim() else '?'}] masks over the last dimension"
        )
    rows, tau = x.shape[0], masks.shape[0]
    groups = torch.arange(rows, device=x.device) * tau // max(rows, 1)
    scaled = masks.to(device=x.device, dtype=x.dtype) * (1.0 / (1.0 - p))
    per_row = scaled[groups].view(rows, *([1] * (x.dim() - 2)), x.shape[-1])
    return x * per_row


def scheduled_subnetworks(
    step: int, period: int, permutation: torch.Tensor, tau: int
) -> torch.Tensor:
    """The ``tau`` subnetwork indices active at ``step``: period ``k = step // period`` takes
    the ``(k mod sigma/tau)``-th group of ``tau`` entries of ``permutation`` (of ``sigma``)."""
    groups = permutation.numel() // tau
    k = (step // period) % groups
    return permutation[k * tau : (k + 1) * tau]


class GyroDropoutLayer(nn.Module):
    """Dropout restricted to ``sigma`` pre-selected masks, ``tau`` of them active at a time.

    The masks (``[sigma, F]`` bool) are drawn from torch's global RNG on the first training
    forward, when ``F`` is known (or set through ``masks``); ``select`` sets the active
    indices (default: the first ``tau``). Neither is in the module's state dict: the
    :class:`GyroDropout` algorithm saves them for resume. Evaluation is the identity.
    """

    def __init__(self, p: float = 0.5, sigma: int = 256, tau: int = 16) -> None:
        super().__init__()
        _check(p, sigma, tau, "gyro_dropout")
        self.p, self.sigma, self.tau = p, sigma, tau
        self.register_buffer("masks", None, persistent=False)
        self.register_buffer("active", torch.arange(tau), persistent=False)

    def select(self, indices: torch.Tensor) -> None:
        """Train the subnetworks ``indices`` (``tau`` of ``range(sigma)``) from now on."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.shape != (self.tau,) or not bool(
            ((indices >= 0) & (indices < self.sigma)).all()
        ):
            raise ValueError(f"expected {self.tau} indices in [0, {self.sigma}), got {indices}")
        self.active = indices.to(self.active.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.masks is None:
            self.masks = torch.rand(self.sigma, x.shape[-1]) >= self.p
        elif self.masks.shape[1] != x.shape[-1]:
            raise ValueError(
                f"gyro dropout masks have {self.masks.shape[1]} features, inputs {x.shape[-1]}"
            )
        if self.masks.device != x.device:
            self.masks = self.masks.to(x.device)
        if self.active.device != x.device:
            self.active = self.active.to(x.device)
        return gyro_dropout(x, self.masks[self.active], self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, sigma={self.sigma}, tau={self.tau}"


def _check(p: float | None, sigma: int, tau: int, prefix: str) -> None:
    if p is not None and not 0.0 <= p < 1.0:
        raise ValueError(f"{prefix}.p must be in [0, 1), got {p}")
    if isinstance(sigma, bool) or not isinstance(sigma, int) or sigma < 1:
        raise ValueError(f"{prefix}.sigma must be an integer >= 1, got {sigma!r}")
    if isinstance(tau, bool) or not isinstance(tau, int) or not 1 <= tau <= sigma:
        raise ValueError(f"{prefix}.tau must be an integer in [1, sigma={sigma}], got {tau!r}")
    if sigma % tau:
        raise ValueError(
            f"{prefix}.sigma must be a multiple of tau (each subnetwork trains for one period "
            f"per cycle), got sigma={sigma}, tau={tau}"
        )


def apply_gyro_dropout(
    model: nn.Module, p: float | None = 0.5, sigma: int = 256, tau: int = 16
) -> list[GyroDropoutLayer]:
    """Replace every ``nn.Dropout`` in ``model`` (in place) by a :class:`GyroDropoutLayer`
    with rate ``p`` (``None``: the layer's own rate). Returns the new layers in model order.

    In a plain loop, draw a permutation of ``range(sigma)`` and before each step call
    ``layer.select(scheduled_subnetworks(step, period, permutation, tau))`` on every layer.
    """
    _check(p, sigma, tau, "gyro_dropout")
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if name and type(module) is nn.Dropout
    ]
    layers = []
    for name, module in chosen:
        layer = GyroDropoutLayer(module.p if p is None else p, sigma, tau)
        layer.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        layers.append(layer)
    return layers


class GyroDropout(Algorithm):
    """Replace dropout with gyro dropout: a fixed pool of sigma subnetworks, tau at a time."""

    name = "gyro_dropout"

    def __init__(
        self,
        p: float | None = 0.5,
        sigma: int = 256,
        tau: int = 16,
        period: str | None = None,
    ) -> None:
        _check(p, sigma, tau, "gyro_dropout")
        self.p, self.sigma, self.tau = p, sigma, tau
        self.period: Time | None = None
        if period is not None:
            try:
                self.period = Time.parse(period)
            except (TypeError, ValueError) as err:
                raise ValueError(f"gyro_dropout.period: {err}") from None
            if self.period.unit == TimeUnit.SECOND or self.period.value <= 0:
                raise ValueError(
                    f"gyro_dropout.period must be a positive Time in ba, ep, sp, tok or dur, "
                    f"got {period!r}"
                )
        #: The layers installed at INIT, in model order.
        self.layers: list[GyroDropoutLayer] = []
        #: Steps each group of ``tau`` subnetworks trains for, resolved at FIT_START.
        self.period_batches = 1
        self.permutation: torch.Tensor | None = None  # of range(sigma), for ``cycle``
        self.cycle: int | None = None
        self._active_period: int | None = None

    def declare(self) -> Declaration:
        # Its place in the one total order of INIT surgery (_init_order): after the surgery
        # that creates or moves dropout modules (GLU, ALiBi, stochastic depth), so their
        # dropouts are replaced too; the rest is independent of dropout.
        return init_surgery(
            "gyro_dropout",
            events={
                Event.FIT_START: Access(reads={"timestamp", "max_duration"}),
                # Which subnetworks train is a training-mode setting of the dropout layers.
                Event.BEFORE_TRAIN_BATCH: Access(reads={"timestamp"}, writes={"model.mode"}),
            },
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.layers = apply_gyro_dropout(state.model, self.p, self.sigma, self.tau)
            if not self.layers:
                warnings.warn(
                    "gyro_dropout: the model has no nn.Dropout module; nothing was replaced",
                    stacklevel=2,
                )
            logger.log_metrics({"gyro_dropout/num_replaced": len(self.layers)})
        elif event == Event.FIT_START:
            self._resolve_period(state)
        elif self.layers:
            self._schedule(state.timestamp.batch)

    def _resolve_period(self, state: State) -> None:
        conv, groups = state.converter, self.sigma // self.tau
        try:
            if self.period is not None:
                batches = conv.to_batches(self.period)
            else:  # the paper's: every subnetwork trains for one period of the run
                batches = conv.to_batches(state.max_duration) / groups
        except ValueError as err:
            raise ConfigError(
                f"algorithms.gyro_dropout.period: {err}; set period to a Time in ba, ep, sp or "
                "tok when max_duration is wall-clock"
            ) from None
        self.period_batches = max(1, math.floor(batches))
        self._active_period = None  # select again (a resume, or a second fit)

    def _schedule(self, batch: int) -> None:
        period = batch // self.period_batches
        if period == self._active_period:
            return
        cycle = period // (self.sigma // self.tau)
        if self.permutation is None or cycle != self.cycle:
            self.permutation = torch.randperm(self.sigma)
            self.cycle = cycle
        indices = scheduled_subnetworks(batch, self.period_batches, self.permutation, self.tau)
        for layer in self.layers:
            layer.select(indices)
        self._active_period = period

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "masks": [None if m.masks is None else m.masks.cpu() for m in self.layers],
            "permutation": self.permutation,
            "cycle": self.cycle,
        }

    def load_state_dict(self, state: dict) -> None:
        masks = state.get("masks", [])
        if len(masks) != len(self.layers):
            raise ValueError(
                f"gyro_dropout: the checkpoint has masks for {len(masks)} dropout layers, "
                f"the model has {len(self.layers)}"
            )
        for layer, saved in zip(self.layers, masks):
            if saved is not None and saved.shape[0] != self.sigma:
                raise ValueError(
                    f"gyro_dropout: saved masks hold {saved.shape[0]} subnetworks, sigma is "
                    f"{self.sigma}"
                )
            layer.masks = None if saved is None else saved.bool()
        self.permutation = state.get("permutation")
        self.cycle = state.get("cycle")
        self._active_period = None
