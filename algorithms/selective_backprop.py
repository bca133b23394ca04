"""Selective backprop: train each step only on the samples likely to matter (high loss).

**What.** Samples the model already fits contribute little gradient. Jiang et al. 2019
("Accelerating deep learning by focusing on the biggest losers", arXiv:1910.00762) run a
forward pass to get each sample's loss and backpropagate only the samples likely to matter.
Between ``start`` and ``end`` (Times; fractions of the run by default), on every
``interval``-th step, at AFTER_DATALOADER a no-grad forward pass computes
``Model.per_sample_loss`` on the full batch, and the batch is cut to the chosen samples, kept
**in their original batch order**. The trainer then runs the usual forward and backward on
the smaller batch, so the loss is a mean over the kept samples. Two rules (``selection``;
``topk`` by default, measured below):

* ``probabilistic`` (the paper's rule ``P(select) = CDF_R(L) ** beta``, as its reference code
  computes it: ``lib/calculators.py`` ``BatchedRelativeProbabilityCalculator`` and
  ``lib/hist.py`` of github.com/angelajiang/SelectiveBackprop): the batch's losses join a
  history of the most recent ``history_size`` losses (default 1024, the reference's
  ``max_history_len``); each sample is then kept independently with probability
  ``P = CDF(loss) ** beta``, CDF being the share of the history strictly below its loss.
  ``beta`` sets the selectivity: 1 keeps about half of the samples, 2 a third, 3 a quarter
  (the paper's range; the reference script's default is 3). The default ``beta=1`` keeps
  about as many samples as top-k's default ``keep=0.5``. The draws come from the algorithm's
  own generator, seeded from the run's seed (and the process rank), and the history and the
  generator's state are in its ``state_dict``, so a run is reproducible and resumes exactly.
  A draw that keeps nobody keeps the highest-loss sample (a step cannot be empty).
* ``topk``: the ``ceil(keep * N)`` highest losses of the batch (at least one; ties go to the
  earlier sample), deterministic, like Composer's ``keep`` fraction within the batch but
  without its loss-weighted random draw.

Departure from the paper: its trainer accumulates the selected samples of successive forward
batches until they fill a whole training batch, then steps; here a step is one batch drawn
from the loader (Times, schedules and the sample-exact resume count loader batches), so a
selected step trains on a smaller, variable-size batch, as Composer's variant does. With
``scale_factor < 1`` the selection forward sees ``inputs`` downscaled (bilinear for
``[N, C, H, W]`` images, linear for ``[N, C, L]`` signals), which makes the extra pass
cheaper; the training forward uses the full resolution. The selection pass runs in train mode
(as the step's own forward would) but leaves BatchNorm running statistics untouched.

**When it helps.** Large datasets where many samples are already learned, and compute-bound
steps. Jiang et al. report reaching target error up to 3.5x faster than standard SGD on
CIFAR-10, CIFAR-100 and SVHN (abstract). Composer's method card reports "decreases in training
time of around 10% without any degradation in performance" with its defaults, which are this
module's window: ``start=0.5dur, end=0.9dur, scale_factor=1.0, interval=2`` (every other step
in the middle 40% of the run trains on about half the batch). Arithmetic for the expected
saving: with a backward costing about two forwards, a selected step costs
``(s + 3 * k) / 3`` of a plain one, ``s`` being the selection forward's relative cost (1 at
full resolution, about ``scale_factor ** 2`` for images) and ``k`` the kept fraction. At the
defaults that is 0.83 on 20% of the steps, about 3% of the run's compute; ``scale_factor=0.5``
makes it 0.58 (about 8%). Larger savings need a larger ``beta`` (smaller ``keep``) or a wider
window, at some accuracy cost.

**Measured here** (``python -m speedup.benchmarks.algorithm_variants --target 0.3``; the
shapes2d recipes' data and optimizer with a 16-channel SmallCNN for 5 epochs, 390 steps,
evaluated every 39; selective backprop at its default window; issue 14): steps to 30% eval
accuracy, seeds 1 and 2, and the mean final accuracy::

    variant                        seed 1   seed 2     mean  vs base final acc
    baseline                        301.8    303.3    302.6    1.000    0.3480
    selective-probabilistic         328.2    314.4    321.3    1.062    0.3375
    selective-topk                  305.9    308.7    307.3    1.015    0.3400

Both train on about half of every other batch in the window and need slightly more steps
than the baseline (each selected step sees fewer samples); the paper's rule (``beta=1``)
needed 4.6% more steps than top-k (``keep=0.5``) and did not measure at least as well, so
``topk`` stays the default and ``probabilistic`` is an option. Two seeds on one small
workload: the gap (14 steps) is the size of the spread between the probabilistic rule's own
two seeds, so it is no verdict on the paper's larger-scale results.

**Composes badly with.** Batch augmentations that mix or erase samples (MixUp, CutMix,
CutOut, ColOut, RandAugment, AugMix) and progressive resizing: selection must rank the clean
batch, so it is declared ``runs_before`` all of them at AFTER_DATALOADER (and ``runs_after``
sequence-length warmup and ALiBi's truncation, so text is ranked as it is trained).
Anything keyed to a fixed batch size (GhostBatchNorm splits, BatchNorm with tiny kept
batches). Under DDP each process selects from its own shard, so with ``probabilistic`` the
processes keep different counts and DDP's average of their mean losses weights their samples
unequally. The timestamp's sample count is the samples drawn from the data; its token count
is the tokens trained on. The model must define ``per_sample_loss`` (classifiers and Hugging
Face models do).

Functional twins: :func:`selection_probabilities` (with :func:`loss_percentiles`,
:func:`updated_history` and :func:`sampled_loss_indices`) for the probabilistic rule,
:func:`select_using_loss` (with :func:`highest_loss_indices`) for top-k, :func:`probe_losses`
and :func:`take_rows` for both.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from speedup.algorithms.sam import bn_stats_frozen

from speedup import distributed
from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.model import Model
from speedup.time import schedule_time

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "SELECTIONS",
    "SelectiveBackprop",
    "highest_loss_indices",
    "kept_count",
    "loss_percentiles",
    "probe_losses",
    "sampled_loss_indices",
    "select_using_loss",
    "selection_probabilities",
    "take_rows",
    "updated_history",
]

Batch = dict[str, torch.Tensor]

#: ``probabilistic``: Jiang et al.'s rule, each sample kept with probability CDF(loss)^beta;
#: ``topk``: the ``ceil(keep * N)`` highest losses of the batch.
SELECTIONS = ("probabilistic", "topk")
#: Measured on shapes2d (see the method card): top-k reached the target in fewer steps.
DEFAULT_SELECTION = "topk"
DEFAULT_KEEP = 0.5
DEFAULT_BETA = 1.0
#: The reference implementation's ``max_history_len`` (lib/SelectiveBackpropper.py).
DEFAULT_HISTORY_SIZE = 1024
#: Offsets the selection draws' seed so they are not torch's global stream for the same seed.
_STREAM = 0x5E1EC7


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


def loss_percentiles(losses: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Each loss's percentile in ``history`` as a fraction: the share of the history strictly
    below it (Jiang et al.'s CDF; the reference's ``percentile_of_score`` / 100)."""
    if history.numel() == 0:
        raise ValueError("the loss history is empty: add the batch's losses to it first")
    below = history.reshape(1, -1) < losses.detach().reshape(-1, 1)
    return below.sum(1).double() / history.numel()


def selection_probabilities(
    losses: torch.Tensor, history: torch.Tensor, beta: float
) -> torch.Tensor:
    """``P(select) = CDF(loss) ** beta`` (Jiang et al. 2019): beta = 1 keeps about
    half of the samples, 2 a third, 3 a quarter (``E[U ** beta] = 1 / (beta + 1)``)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return loss_percentiles(losses, history) ** beta


def updated_history(history: torch.Tensor, losses: torch.Tensor, size: int) -> torch.Tensor:
    """The last ``size`` losses of ``history`` followed by ``losses`` (a FIFO window, the
    reference's ``deque(maxlen=R)``)."""
    joined = torch.cat([history.reshape(-1), losses.detach().reshape(-1).to(history)])
    return joined[-size:].clone()


def sampled_loss_indices(
    losses: torch.Tensor,
    history: torch.Tensor,
    beta: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices (ascending) of the samples kept by independent draws with probability
    :func:`selection_probabilities`. A draw that keeps nobody keeps the highest-loss sample
    (the earliest among equals): a step cannot train on an empty batch. The uniform draws
    come from ``generator`` (CPU) or torch's global RNG, one per sample."""
    probabilities = selection_probabilities(losses.detach().float().cpu(), history.cpu(), beta)
    draws = torch.rand(probabilities.shape, generator=generator, dtype=torch.float64)
    kept = torch.nonzero(draws < probabilities).flatten()
    if kept.numel() == 0:
        kept = torch.argsort(losses.detach().cpu(), descending=True, stable=True)[:1]
    return kept.to(losses.device)


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


def probe_losses(
    batch: Batch, model: Model, scale_factor: float = 1.0, input_key: str = "inputs"
) -> torch.Tensor:
    """``model.per_sample_loss`` of every sample, from one forward pass without gradients (on
    ``batch[input_key]`` downscaled by ``scale_factor`` when below 1; BatchNorm statistics
    untouched)."""
    if not 0.0 < scale_factor <= 1.0:
        raise ValueError(f"scale_factor must be in (0, 1], got {scale_factor}")
    probe = dict(batch)
    if scale_factor < 1.0:
        probe[input_key] = _downscale(batch[input_key], scale_factor)
    with torch.no_grad(), bn_stats_frozen(model):
        return model.per_sample_loss(model(probe), batch).float()


def take_rows(batch: Batch, index: torch.Tensor) -> Batch:
    """``batch`` indexed by ``index`` in every tensor whose first dimension is the batch size;
    other entries pass through."""
    rows = int(next(iter(batch.values())).shape[0])
    return {
        key: value[index]
        if torch.is_tensor(value) and value.dim() and value.shape[0] == rows
        else value
        for key, value in batch.items()
    }


def select_using_loss(
    batch: Batch,
    model: Model,
    keep: float = 0.5,
    scale_factor: float = 1.0,
    input_key: str = "inputs",
) -> tuple[Batch, torch.Tensor]:
    """The samples of ``batch`` with the highest ``model.per_sample_loss`` (top-k selection),
    and their indices: :func:`probe_losses`, :func:`highest_loss_indices`, :func:`take_rows`."""
    index = highest_loss_indices(probe_losses(batch, model, scale_factor, input_key), keep)
    return take_rows(batch, index), index


class SelectiveBackprop(Algorithm):
    """Backpropagate only the samples likely to matter (high loss) in a window of the run."""

    name = "selective_backprop"
    # Jiang et al. 2019 keep about a third to a half of the examples; start/end as fractions.
    SEARCH_SPACE = {
        "start": {"type": "float", "low": 0.1, "high": 0.5, "unit": "dur"},
        "end": {"type": "float", "low": 0.6, "high": 0.95, "unit": "dur"},
    }

    def __init__(
        self,
        start: str = "0.5dur",
        end: str = "0.9dur",
        selection: str = DEFAULT_SELECTION,
        keep: float | None = None,
        beta: float | None = None,
        history_size: int | None = None,
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
        if selection not in SELECTIONS:
            raise ValueError(
                f"selective_backprop.selection must be one of {', '.join(SELECTIONS)}, "
                f"got {selection!r}"
            )
        # An argument of the other rule is refused, not ignored: a recipe written for top-k
        # (keep: 0.3) must not silently train with the probabilistic rule instead.
        given = {"keep": keep, "beta": beta, "history_size": history_size}
        own = {"topk": ("keep",), "probabilistic": ("beta", "history_size")}[selection]
        misplaced = [k for k, v in given.items() if v is not None and k not in own]
        if misplaced:
            other = "probabilistic" if selection == "topk" else "topk"
            raise ValueError(
                f"selective_backprop.{misplaced[0]} applies to selection {other!r} only, and "
                f"selection is {selection!r}"
                + ("; set beta instead (1 keeps about half)" if other == "topk" else "")
            )
        keep = DEFAULT_KEEP if keep is None else keep
        beta = DEFAULT_BETA if beta is None else beta
        history_size = DEFAULT_HISTORY_SIZE if history_size is None else history_size
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"selective_backprop.keep must be in (0, 1], got {keep}")
        if not beta > 0.0:
            raise ValueError(f"selective_backprop.beta must be > 0, got {beta}")
        if not isinstance(history_size, int) or isinstance(history_size, bool) or history_size < 1:
            raise ValueError(
                f"selective_backprop.history_size must be an integer >= 1, got {history_size!r}"
            )
        if not 0.0 < scale_factor <= 1.0:
            raise ValueError(
                f"selective_backprop.scale_factor must be in (0, 1], got {scale_factor}"
            )
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(
                f"selective_backprop.interval must be an integer >= 1, got {interval!r}"
            )
        self.selection = selection
        self.keep = keep
        self.beta = float(beta)
        self.history_size = history_size
        self.scale_factor = scale_factor
        self.interval = interval
        self.input_key = input_key
        self._window = (0.0, 0.0)  # [start, end) in batches, resolved at fit start
        #: The most recent ``history_size`` probe losses (probabilistic selection), on the CPU.
        self.history = torch.zeros(0, dtype=torch.float32)
        #: The selection draws' RNG: seeded from the run's seed at the first fit start, or
        #: restored from a checkpoint (then the draws continue where the saved run was).
        self.generator: torch.Generator | None = None
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

    def active(self, state: State) -> bool:
        """Whether the batch about to be trained is selected from."""
        batch = state.timestamp.batch
        begin, finish = self._window
        return begin <= batch < finish and batch % self.interval == 0

    def match(self, event: Event, state: State) -> bool:
        return event == Event.FIT_START or self.active(state)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state)
            return
        try:
            with _autocast(state):
                losses = probe_losses(state.batch, state.model, self.scale_factor, self.input_key)
            state.batch = take_rows(state.batch, self._select(losses))
        except (KeyError, ValueError) as err:
            raise ConfigError(f"algorithms.selective_backprop: {err}") from None
        self.steps_applied += 1

    def _select(self, losses: torch.Tensor) -> torch.Tensor:
        if self.selection == "topk":
            return highest_loss_indices(losses, self.keep)
        # As the reference does: the batch's losses join the history first, then each is
        # ranked against it (so the first batch is ranked against itself).
        cpu_losses = losses.detach().float().cpu()
        self.history = updated_history(self.history, cpu_losses, self.history_size)
        return sampled_loss_indices(losses, self.history, self.beta, self.generator)

    def _fit_start(self, state: State) -> None:
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
        if self.generator is None:  # each process draws its own stream under DDP
            seed = (int(state.seed) * 1_000_003 + distributed.rank() + _STREAM) % 2**63
            self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {
            "history": self.history.clone(),
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = state.get("history", torch.zeros(0)).float().cpu()[-self.history_size :]
        if state.get("generator") is not None:
            self.generator = torch.Generator()
            self.generator.set_state(state["generator"])


def _autocast(state: State) -> contextlib.AbstractContextManager:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(state.precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(state.device.type, dtype=dtype)
