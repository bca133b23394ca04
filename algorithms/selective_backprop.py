"""Selective backprop: train each step only on the batch's highest-loss samples.

**What.** Samples the model already fits contribute little gradient. Jiang et al. 2019
("Accelerating deep learning by focusing on the biggest losers", arXiv:1910.00762) run a
forward pass to get each sample's loss and backpropagate only the samples likely to matter;
theirs keeps sample ``i`` with probability ``CDF(L_i)^beta`` over a window of recent losses,
Composer's draws ``keep * N`` samples weighted by their loss rank. This is a
deterministic variant of both: between ``start`` and ``end`` (Times; fractions of the run by
default), on every ``interval``-th step, at AFTER_DATALOADER a no-grad forward pass computes
``Model.per_sample_loss`` on the full batch and the batch is cut to the ``ceil(keep * N)``
samples with the highest loss (at least one), kept **in their original batch order**; ties
go to the earlier sample. The trainer then runs the usual forward and backward on the smaller
batch, so the loss is a mean over the kept samples. With ``scale_factor < 1`` the selection
forward sees ``inputs`` downscaled (bilinear for ``[N, C, H, W]`` images, linear for
``[N, C, L]`` signals), which makes the extra pass cheaper; the training forward uses the
full resolution. The selection pass runs in train mode (as the step's own forward would)
but leaves BatchNorm running statistics untouched.

**When it helps.** Large datasets where many samples are already learned, and compute-bound
steps. Jiang et al. report reaching target error up to 3.5x faster than standard SGD on
CIFAR-10, CIFAR-100 and SVHN (abstract). Composer's method card reports "decreases in training
time of around 10% without any degradation in performance" with its defaults, which are this
module's: ``start=0.5dur, end=0.9dur, keep=0.5, scale_factor=1.0, interval=2`` (every
other step in the middle 40% of the run trains on half the batch). Arithmetic for the
expected saving: with a backward costing about two forwards, a selected step costs
``(s + 3 * keep) / 3`` of a plain one, ``s`` being the selection forward's relative cost (1 at
full resolution, about ``scale_factor ** 2`` for images). At the defaults that is 0.83 on 20%
of the steps, about 3% of the run's compute; ``scale_factor=0.5`` makes it 0.58 (about 8%).
Larger savings need a smaller ``keep`` or a wider window, at some accuracy cost.

**Composes badly with.** Batch augmentations that mix or erase samples (MixUp, CutMix,
CutOut, ColOut, RandAugment, AugMix) and progressive resizing: selection must rank the clean
batch, so it is declared ``runs_before`` all of them at AFTER_DATALOADER (and ``runs_after``
sequence-length warmup and ALiBi's truncation, so text is ranked as it is trained).
Anything keyed to a fixed batch size (GhostBatchNorm splits, BatchNorm with tiny kept
batches). Sample counts in the timestamp count the samples trained on, so ``sp`` Times
advance more slowly while it is active. The model must define ``per_sample_loss``
(classifiers and Hugging Face models do).

Functional twins: :func:`select_using_loss`, :func:`highest_loss_indices`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from speedup.algorithms.sam import bn_stats_frozen

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.config import ConfigError
from speedup.event import Event
from speedup.models.base import Model
from speedup.time import schedule_time

__all__ = ["SelectiveBackprop", "highest_loss_indices", "kept_count", "select_using_loss"]

Batch = dict[str, torch.Tensor]


def kept_count(n: int, keep: float) -> int:
    """``ceil(keep * n)``, at least 1 (float error absorbed: 0.3 * 10 keeps 3, not 4)."""
    return max(1, min(n, math.ceil(keep * n - 1e-9)))


def highest_loss_indices(losses: torch.Tensor, keep: float) -> torch.Tensor:
    """Indices of the :func:`kept_count` highest losses, ascending (original order); among
    equal losses the earlier sample wins."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    count = kept_count(losses.shape[0], keep)
    order = torch.argsort(losses.detach(), descending=True, stable=True)
    return order[:count].sort().values


def _downscale(inputs: torch.Tensor, scale_factor: float) -> torch.Tensor:
    if scale_factor == 1.0:
        return inputs
    if not inputs.is_floating_point() or inputs.dim() not in (3, 4):
        raise ValueError(
            "scale_factor < 1 needs floating [N, C, L] or [N, C, H, W] inputs, got "
            f"{inputs.dtype} {list(inputs.shape)}"
        )
    mode = "bilinear" if inputs.dim() == 4 else "linear"
    return F.interpolate(inputs, scale_factor=scale_factor, mode=mode, align_corners=False)


def select_using_loss(
    batch: Batch,
    model: Model,
    keep: float = 0.5,
    scale_factor: float = 1.0,
    input_key: str = "inputs",
) -> tuple[Batch, torch.Tensor]:
    """The samples of ``batch`` with the highest ``model.per_sample_loss``, and their indices.

    Runs ``model`` once without gradients (on ``batch[input_key]`` downscaled by
    ``scale_factor`` when below 1; BatchNorm statistics untouched) and indexes every tensor of
    the batch whose first dimension is the batch size; other entries pass through.
    """
    if not 0.0 < scale_factor <= 1.0:
        raise ValueError(f"scale_factor must be in (0, 1], got {scale_factor}")
    rows = int(next(iter(batch.values())).shape[0])
    probe = dict(batch)
    if scale_factor < 1.0:
        probe[input_key] = _downscale(batch[input_key], scale_factor)
    with torch.no_grad(), bn_stats_frozen(model):
        losses = model.per_sample_loss(model(probe), batch)
    index = highest_loss_indices(losses.float(), keep)
    selected = {
        key: value[index]
        if torch.is_tensor(value) and value.dim() and value.shape[0] == rows
        else value
        for key, value in batch.items()
    }
    return selected, index


class SelectiveBackprop(Algorithm):
    """Backpropagate only the highest-loss fraction of each batch in a window of the run."""

    name = "selective_backprop"

    def __init__(
        self,
        start: str = "0.5dur",
        end: str = "0.9dur",
        keep: float = 0.5,
        scale_factor: float = 1.0,
        interval: int = 2,
        input_key: str = "inputs",
    ) -> None:
        self.start, self.end = (
            schedule_time("selective_backprop.start", start),
            schedule_time("selective_backprop.end", end),
        )
        if self.start.unit == self.end.unit and self.end <= self.start:
            raise ValueError(
                f"selective_backprop.end must be after start, got start={start!r} end={end!r}"
            )
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"selective_backprop.keep must be in (0, 1], got {keep}")
        if not 0.0 < scale_factor <= 1.0:
            raise ValueError(
                f"selective_backprop.scale_factor must be in (0, 1], got {scale_factor}"
            )
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(
                f"selective_backprop.interval must be an integer >= 1, got {interval!r}"
            )
        self.keep = keep
        self.scale_factor = scale_factor
        self.interval = interval
        self.input_key = input_key
        self._window = (0.0, 0.0)  # [start, end) in batches, resolved at fit start
        self.steps_applied = 0  # selections in this process (for logs and tests, not resume)

    def declare(self) -> Declaration:
        return Declaration(
            events={
                Event.FIT_START: Access(reads={"timestamp", "max_duration"}),
                Event.AFTER_DATALOADER: Access(
                    reads={"batch", "model.weights", "model.mode", "timestamp"},
                    writes={"batch"},
                ),
            },
            # Rank the clean, full-resolution batch, before anything mixes, erases or resizes it.
            runs_before={
                "mixup",
                "cutmix",
                "cutout",
                "colout",
                "randaugment",
                "augmix",
                "progressive_resizing",
            },
            # Rank language batches as they will be trained: after truncation or reshaping.
            runs_after={"seq_length_warmup", "alibi"},
        )

    def active(self, state) -> bool:  # noqa: ANN001
        """Whether the batch about to be trained is selected from."""
        batch = state.timestamp.batch
        begin, finish = self._window
        return begin <= batch < finish and batch % self.interval == 0

    def match(self, event: Event, state) -> bool:  # noqa: ANN001
        return event == Event.FIT_START or self.active(state)

    def apply(self, event: Event, state, logger) -> None:  # noqa: ANN001
        if event == Event.FIT_START:
            self._fit_start(state)
            return
        try:
            with _autocast(state):
                state.batch, _ = select_using_loss(
                    state.batch, state.model, self.keep, self.scale_factor, self.input_key
                )
        except (KeyError, ValueError) as err:
            raise ConfigError(f"algorithms.selective_backprop: {err}") from None
        self.steps_applied += 1

    def _fit_start(self, state) -> None:  # noqa: ANN001
        if type(state.model).per_sample_loss is Model.per_sample_loss:
            raise ConfigError(
                f"algorithms.selective_backprop: {type(state.model).__name__} does not define "
                "per_sample_loss, which selection ranks samples by"
            )
        try:
            window = tuple(state.converter.to_batches(t) for t in (self.start, self.end))
        except ValueError as err:
            raise ConfigError(f"algorithms.selective_backprop: {err}") from None
        if window[1] <= window[0]:
            raise ConfigError(
                f"algorithms.selective_backprop: end ({self.end}) is not after start "
                f"({self.start}) in this run"
            )
        self._window = window


def _autocast(state) -> contextlib.AbstractContextManager:  # noqa: ANN001
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(state.precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(state.device.type, dtype=dtype)
