"""Test-time augmentation (TTA): evaluate on flipped and shifted views, average the logits.

**What.** At evaluation the model also sees transformed copies of each image and the logits
(not the probabilities) of the views are averaged. ``level=1`` is the mirror: half the
original's logits plus half the horizontally flipped image's (hlb-CIFAR10's eval forward).
``level=2`` is airbench's six views (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a
single GPU", arXiv 2404.00498; reference ``airbench94_muon.py``, ``infer``): the original and
its mirror with weight 1/4 each, and two 1-pixel translations, each with its mirror, with
weight 1/8 each. A translation pads the image by one pixel with reflection and crops the
original size at offset (0, 0) (content moved down-right) and at (2, 2) (up-left).

**Selective TTA.** With ``uncertain_fraction`` set (Hiverge's CIFAR-10 speedrun,
hiverge/cifar10-speedrun ``cifar10_speedrun.py``, ``UNCERTAIN_QUANTILE``), a plain pass comes
first; only the ``floor(uncertain_fraction * n)`` images with the lowest maximum softmax
probability get the views, and their logits are replaced by the *uniform* mean of all the
views (as Hiverge does); the others keep their plain logits. Hiverge selects over the whole
test set; here the trainer evaluates batch by batch, so the fraction is taken in each eval
batch (a large eval batch, as the embedded recipes use, makes the two nearly the same).

**What is recorded.** Every evaluation also reports the plain (one-view) metrics under
``eval/<name>_plain`` (``eval/accuracy_plain``, ``eval/loss_plain``) beside the TTA ones, and
``tta/seconds``, the time the extra views cost in that evaluation. Training time in this
project excludes evaluation, so a time-to-target read from ``train_time_s`` does not include
TTA; the speedruns count it (airbench times its TTA pass), so add ``tta/seconds`` of the
deciding evaluation when comparing against them.

**When it helps.** Image classification where the label is invariant to mirroring and small
shifts. From Hiverge's published logs (2,000 runs of its CIFAR-10 speedrun), plain accuracy
93.17% becomes 94.01% with selective TTA, +0.84 points (the project's research note,
``search-and-records.md`` section 5). The gain costs no training: eval cost grows to 2x
(``level=1``), 6x (``level=2``) or ``1 + 5 * uncertain_fraction`` times (selective) plain
evaluation.

**Composes badly with.** Labels that change under a mirror or shift. Models whose outputs
are not ``[N, classes]`` logits (dense prediction would need the outputs flipped back):
refused at the first evaluation. Translations assume images of at least 2x2 pixels.

Functional twin: :func:`tta_logits` (with :func:`tta_views`, :func:`low_confidence` and
:func:`selective_tta_logits`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from speedup import distributed
from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "AIRBENCH_WEIGHTS",
    "TestTimeAugmentation",
    "low_confidence",
    "selective_tta_logits",
    "tta_logits",
    "tta_views",
]

LEVELS = (1, 2)
#: airbench's weights per view, in :func:`tta_views` order: original, mirror, then the two
#: translations each followed by its mirror.
AIRBENCH_WEIGHTS: dict[int, tuple[float, ...]] = {
    1: (0.5, 0.5),
    2: (0.25, 0.25, 0.125, 0.125, 0.125, 0.125),
}


def _check_level(level: int, key: str) -> None:
    if isinstance(level, bool) or level not in LEVELS:
        raise ValueError(f"{key} must be one of {', '.join(map(str, LEVELS))}, got {level!r}")


def tta_views(inputs: torch.Tensor, level: int = 2) -> list[torch.Tensor]:
    """The views of ``[N, C, H, W]`` images: ``[x, mirror(x)]`` at level 1; at level 2 also
    the 1-pixel translations ``t1``, ``mirror(t1)``, ``t2``, ``mirror(t2)``, where ``t1`` and
    ``t2`` are the crops at (0, 0) and (2, 2) of ``x`` reflect-padded by one pixel."""
    _check_level(level, "level")
    if inputs.dim() != 4:
        raise ValueError(f"inputs must be images [N, C, H, W], got shape {tuple(inputs.shape)}")
    views = [inputs, inputs.flip(-1)]
    if level == 2:
        height, width = inputs.shape[-2:]
        padded = F.pad(inputs, (1, 1, 1, 1), mode="reflect")
        for offset in (0, 2):
            shifted = padded[..., offset : offset + height, offset : offset + width]
            views += [shifted, shifted.flip(-1)]
    return views


def tta_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    level: int = 2,
    weights: Sequence[float] | None = None,
    plain: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i weights[i] * forward(view_i)`` over :func:`tta_views` (airbench's weights by
    default). ``plain``, the logits of ``inputs`` already computed, saves one forward."""
    views = tta_views(inputs, level)
    weights = tuple(AIRBENCH_WEIGHTS[level] if weights is None else weights)
    if len(weights) != len(views):
        raise ValueError(f"level {level} has {len(views)} views, got {len(weights)} weights")
    total = None
    for i, (weight, view) in enumerate(zip(weights, views)):
        logits = plain if i == 0 and plain is not None else forward(view)
        term = weight * logits.float()
        total = term if total is None else total + term
    assert total is not None
    return total


def low_confidence(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``floor(fraction * N)`` rows of ``[N, classes]`` logits with the lowest
    maximum softmax probability, least confident first."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    count = int(logits.shape[0] * fraction)
    confidence = F.softmax(logits.float(), dim=1).amax(dim=1)
    return torch.topk(confidence, count, largest=False, sorted=True).indices


def selective_tta_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    logits: torch.Tensor,
    fraction: float = 0.25,
    level: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hiverge's selective TTA: ``logits`` (the plain pass over ``inputs``) with the rows of
    the :func:`low_confidence` ``fraction`` replaced by the uniform mean of the views' logits.
    Returns the new logits (float32) and the replaced rows' indices."""
    chosen = low_confidence(logits, fraction)
    out = logits.float().clone()
    if chosen.numel():
        views = len(AIRBENCH_WEIGHTS[level])
        out[chosen] = tta_logits(
            forward, inputs[chosen], level, (1.0 / views,) * views, plain=logits[chosen]
        )
    return out, chosen


class TestTimeAugmentation(Algorithm):
    """Average the logits of mirrored (and 1-pixel shifted) views at evaluation."""

    __test__ = False  # the name starts with "Test": keep pytest from collecting it
    name = "test_time_augmentation"

    #: Tuner choices: airbench's two view sets (level 1: flip; level 2: flip and translate).
    SEARCH_SPACE = {"level": {"type": "categorical", "choices": [1, 2]}}

    def __init__(self, level: int = 2, uncertain_fraction: float | None = None) -> None:
        _check_level(level, "test_time_augmentation.level")
        if uncertain_fraction is not None and (
            isinstance(uncertain_fraction, bool)
            or not isinstance(uncertain_fraction, (int, float))
            or not 0.0 < uncertain_fraction <= 1.0
        ):
            raise ValueError(
                "test_time_augmentation.uncertain_fraction must be in (0, 1] or null (every "
                f"image), got {uncertain_fraction!r}"
            )
        self.level = level
        self.uncertain_fraction = uncertain_fraction
        #: Indices (in the eval batch) that got the views in the last eval batch.
        self.last_selected: torch.Tensor | None = None
        self._plain: dict[str, list] = {}
        self._seconds = 0.0
        self._images = 0

    def declare(self) -> Declaration:
        return Declaration(
            events={
                Event.EVAL_START: Access(),
                Event.EVAL_AFTER_FORWARD: Access(
                    reads={"outputs", "batch", "model.modules", "precision"},
                    writes={"outputs"},
                ),
                Event.EVAL_END: Access(reads={"eval_metrics"}, writes={"eval_metrics"}),
            },
            data_kinds={"image"},
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.EVAL_START:
            self._plain, self._seconds, self._images = {}, 0.0, 0
        elif event == Event.EVAL_AFTER_FORWARD:
            self._augment(state)
        else:
            self._report(state, logger)

    def _augment(self, state: State) -> None:
        logits, batch = state.outputs, state.batch
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ConfigError(
                "algorithms.test_time_augmentation: needs [N, classes] logits from the model's "
                f"eval forward; got {shape}"
            )
        for name, (value, count) in state.model.metrics(logits, batch).items():
            total = self._plain.setdefault(name, [0.0, 0])
            total[0] = total[0] + value
            total[1] += count
        started = time.perf_counter()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(state.precision)
        device = logits.device

        def forward(view: torch.Tensor) -> torch.Tensor:
            autocast = (
                torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
            )
            with autocast:
                return state.model.eval_forward({**batch, "inputs": view})

        inputs = batch["inputs"]
        if self.uncertain_fraction is None:
            out = tta_logits(forward, inputs, self.level, plain=logits)
            self.last_selected = torch.arange(inputs.shape[0], device=device)
        else:
            out, self.last_selected = selective_tta_logits(
                forward, inputs, logits, self.uncertain_fraction, self.level
            )
        state.outputs = out.to(logits.dtype)
        if device.type == "cuda":  # the views ran asynchronously: wait to time them
            torch.cuda.synchronize(device)
        self._seconds += time.perf_counter() - started
        self._images += int(self.last_selected.numel())

    def _report(self, state: State, logger: Logger) -> None:
        totals = self._plain
        if distributed.world_size() > 1:  # every process evaluated its share: add them up
            names = list(totals)
            packed = torch.tensor([[float(totals[n][0]), float(totals[n][1])] for n in names])
            packed = distributed.all_reduce_sum(packed.double().to(state.device)).cpu()
            totals = {n: [packed[i, 0].item(), packed[i, 1].item()] for i, n in enumerate(names)}
        averages = {n: float(v) / max(float(c), 1.0) for n, (v, c) in totals.items()}
        plain = state.model.finalize_metrics(averages)
        state.eval_metrics = {
            **state.eval_metrics,
            **{f"{name}_plain": value for name, value in plain.items()},
        }
        # The whole record again, so the last eval record of a run holds every eval metric.
        record = {f"eval/{k}": v for k, v in state.eval_metrics.items()}
        record["tta/seconds"] = self._seconds
        record["tta/augmented_images"] = self._images
        logger.log_metrics(record)
