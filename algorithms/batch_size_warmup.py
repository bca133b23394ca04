"""Batch-size warmup: train on a fraction of each batch early on, with the LR scaled to it.

**What.** The batch grows during training, from ``start_fraction`` of the loaded batch to all
of it over ``duration``, and the learning rate follows the batch: each step's LR is the
schedule's LR times ``(b / B) ** lr_power`` for ``b`` rows trained out of ``B`` loaded. With
``p`` the progress through ``duration`` (0 at the start, 1 at its end), the trained fraction
is ``start_fraction + (1 - start_fraction) * floor(p * stages) / stages`` for ``p < 1`` (the
batch steps up ``stages`` times in equal parts of the span), or the linear ramp
``start_fraction + (1 - start_fraction) * p`` with ``stages: null``; the row count is that
fraction of ``B`` rounded down (to a multiple of ``multiple_of``), and ``B`` from ``p = 1``
on (:func:`warmup_batch_size`, :func:`lr_multiplier`).

It is implemented by training on the **first ``b`` rows** of each loaded batch (at
AFTER_DATALOADER; the other rows are skipped, not kept for later), rather than by
accumulating several small loader batches into one step: the loader, its sample-exact
position and every other part of the run stay as they are, and a small early step costs
what its rows cost. The data therefore goes by faster than the training: ``timestamp.sample``
and the data position count the samples *drawn*, while this algorithm counts the samples
*trained* (``samples`` in its state) and ``timestamp.token`` counts the tokens trained.
Progress ``p`` is measured in the unit of ``duration``: ``ba`` steps, ``ep`` epochs (drawn),
``sp`` samples trained, ``tok`` tokens trained, ``dur`` the run's own clock
(``max_duration``'s unit). A ``tok`` budget (``max_duration: ...tok``) then trains the same
number of tokens as without warmup, in more steps, as in GPT-3; a ``ba`` budget takes the
same steps and trains fewer tokens.

**Defaults** follow modded-nanogpt record #46
(records/track_1_short/2025-11-29_BatchSizeSchedule: three equal phases of training at 8, 16
and 24 x 2048 x 8 tokens per step): ``start_fraction`` 1/3, ``stages`` 2 over the first
``0.67dur``, then the full batch. Its LR
multipliers, relative to the first phase, were 1.0, 1.52 (= 2^0.6) and 1.73 (= 3^0.5), i.e.
close to square-root scaling: ``lr_power`` 0.5 here (relative to the full batch, whose LR the
recipe sets: 0.577, 0.816, 1). McCandlish et al. (2018, "An empirical model of large-batch
training", arXiv 1812.06162, section 2 and appendix D) motivate the ramp: the gradient noise
scale, and with it the useful batch size, grows as the loss falls. GPT-3 (Brown et al. 2020,
"Language models are few-shot learners", appendix B) ramps the batch linearly from 32k
tokens to its full size over the first 4-12 billion tokens (``stages: null``,
``duration: ...tok``), without coupling the LR (``lr_power: 0``).

**Gradient accumulation.** ``microbatch_size`` splits the rows that are left: a step of
``b`` rows runs ``ceil(b / microbatch_size)`` microbatches, the last one partial (the loss
weighting keeps its gradient the batch's). Memory peaks at the full batch's microbatch as
before. ``multiple_of: <microbatch_size>`` keeps every microbatch full. Under DDP each
process keeps the same fraction of its own batch, and ``samples`` counts all processes.

**When it helps.** Record #46 of the speedrun: 65 fewer steps to the 3.28 validation loss,
134.04 -> 132.21 s on 8xH100 (n = 8, p = 0.0045); GPT-3 uses the ramp at every model size.
The saving is compute per early step (a third of the batch costs a third) at little loss of
progress per step while the gradient noise scale is small. At CPU scale it costs steps and
saves compute, about evenly: alone on benchmarks/suites/stdlib-gpt-speedrun.yaml (2-layer
GPT-2, 120-step budget, 2 seeds) 79.4 steps to eval loss 6.4 against the baseline's 72.8, at
0.75x the per-step cost over the run: a calibrated 1.45x whose 95% interval [0.76, 2.56]
spans no effect. Compare by samples or time, not by steps.

**Composes badly with.** LR schedules and other schedules written in ``sp``/``tok`` units
assume full batches (the trainer converts them at the loader's batch size); use ``ba`` or
``dur`` schedules. Optimizers with their own LR logic (schedule-free) see the scaled LR
in ``param_groups``. Algorithms that read whole batches after it (mixing, selective
backprop, sequence reshaping) see the kept rows only (declared: this runs first at
AFTER_DATALOADER). Without an LR scheduler the LR it scales is restored after each step; an
LR scheduler (speedup's are closed-form LambdaLRs) recomputes the LR itself.

Functional twins: :func:`warmup_batch_size`, :func:`lr_multiplier`, :func:`first_rows`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from speedup import distributed
from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.time import Time, TimeUnit, schedule_time

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["BatchSizeWarmup", "first_rows", "lr_multiplier", "warmup_batch_size"]

Batch = dict[str, torch.Tensor]


def warmup_batch_size(
    progress: float,
    full: int,
    start_fraction: float = 1 / 3,
    stages: int | None = 2,
    multiple_of: int = 1,
) -> int:
    """Rows to train at ``progress`` (0 to 1) through the warmup, out of ``full`` loaded.

    ``start_fraction + (1 - start_fraction) * floor(progress * stages) / stages`` of
    ``full`` (the linear ramp without flooring when ``stages`` is None), rounded down to a
    multiple of ``multiple_of`` and at least one multiple (or ``full`` when smaller);
    ``full`` from ``progress >= 1`` on.
    """
    if progress >= 1.0 or full <= 0:
        return full
    progress = max(0.0, progress)
    step = progress if stages is None else math.floor(progress * stages) / stages
    fraction = start_fraction + (1.0 - start_fraction) * step
    rows = math.floor(fraction * full + 1e-9)  # 2/3 of 24 is 16, not 15.999...
    rows = rows // multiple_of * multiple_of
    return min(full, max(rows, multiple_of, 1))


def lr_multiplier(rows: int, full: int, power: float = 0.5) -> float:
    """``(rows / full) ** power``: the LR of a batch of ``rows`` relative to the full one's."""
    return (rows / full) ** power if full > 0 else 1.0


def first_rows(batch: Batch, rows: int) -> Batch:
    """The first ``rows`` of every tensor of ``batch`` whose leading dimension is the batch's
    (a new dict; other entries pass unchanged)."""
    size = int(next(iter(batch.values())).shape[0])
    if rows >= size:
        return dict(batch)
    return {
        k: v[:rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size else v
        for k, v in batch.items()
    }


def _check(
    start_fraction: float, stages: int | None, lr_power: float, multiple_of: int, prefix: str
) -> None:
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def integer(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not number(start_fraction) or not 0.0 < start_fraction <= 1.0:
        raise ValueError(f"{prefix}start_fraction must be in (0, 1], got {start_fraction!r}")
    if stages is not None and (not integer(stages) or stages < 1):
        raise ValueError(
            f"{prefix}stages must be an integer >= 1, or null for a linear ramp; got {stages!r}"
        )
    if not number(lr_power) or lr_power < 0:
        raise ValueError(
            f"{prefix}lr_power must be >= 0 (0: the LR is not coupled), got {lr_power!r}"
        )
    if not integer(multiple_of) or multiple_of < 1:
        raise ValueError(f"{prefix}multiple_of must be an integer >= 1, got {multiple_of!r}")


class BatchSizeWarmup(Algorithm):
    """Grow the trained batch from a fraction of the loaded one to all of it, LR coupled."""

    name = "batch_size_warmup"

    #: Tuner ranges around modded-nanogpt record #46's schedule (a third of the batch, two
    #: thirds of the run).
    SEARCH_SPACE = {
        "start_fraction": {"type": "float", "low": 0.25, "high": 0.75},
        "duration": {"type": "float", "low": 0.3, "high": 0.8, "unit": "dur"},
    }

    def __init__(
        self,
        duration: str = "0.67dur",
        start_fraction: float = 1 / 3,
        stages: int | None = 2,
        lr_power: float = 0.5,
        multiple_of: int = 1,
    ) -> None:
        self.duration = schedule_time("batch_size_warmup.duration", duration)
        _check(start_fraction, stages, lr_power, multiple_of, "batch_size_warmup.")
        self.start_fraction = float(start_fraction)
        self.stages = stages
        self.lr_power = float(lr_power)
        self.multiple_of = multiple_of
        #: Samples trained so far (kept rows, all processes): the clock of ``sp`` durations.
        self.samples = 0
        #: The span in the unit progress is counted in (``ba``, ``sp``, ``tok`` or ``dur``),
        #: resolved at FIT_START.
        self._span: Time | None = None
        self._multiplier = 1.0
        self._scheduled: list[float] | None = None  # each group's LR before scaling
        self._logged: tuple[int, float] | None = None

    def time_constants(self) -> dict[str, Time]:
        return {"duration": self.duration}  # longer than the run: never trains the full batch

    def declare(self) -> Declaration:
        events = {
            Event.FIT_START: Access(reads={"max_duration"}),
            Event.AFTER_DATALOADER: Access(reads={"batch", "timestamp"}, writes={"batch"}),
        }
        if self.lr_power != 0:
            events[Event.AFTER_TRAIN_BATCH] = Access(reads={"lr"}, writes={"lr"})
            events[Event.BATCH_END] = Access(reads={"lr", "scheduler"}, writes={"lr"})
        return Declaration(
            events=events,
            # First at AFTER_DATALOADER: the others then process (and count) the kept rows
            # only. At BATCH_END the LR is restored before rewinding may set its own.
            runs_before={
                "alibi",
                "seq_length_warmup",
                "selective_backprop",
                "augmix",
                "channels_last",
                "colout",
                "cutmix",
                "cutout",
                "mixup",
                "progressive_resizing",
                "randaugment",
                "rewinding",
            },
        )

    # -- schedule ---------------------------------------------------------------------------

    def _resolve(self, state: State) -> Time:
        duration = self.duration
        if duration.unit == TimeUnit.EPOCH:  # epochs of drawn batches: a fixed step count
            try:
                return Time(state.converter.to_batches(duration), TimeUnit.BATCH)
            except ValueError as err:
                raise ConfigError(f"algorithms.batch_size_warmup.duration: {err}") from None
        if duration.unit == TimeUnit.TOKEN and not state.converter.tokens_per_sample:
            raise ConfigError(
                f"algorithms.batch_size_warmup.duration: {duration.value}tok needs token data; "
                "this data counts no tokens (use ba, ep, sp or dur)"
            )
        return duration

    def progress(self, state: State) -> float:
        """How far through ``duration`` training is (1 and more: done), in its unit."""
        span = self._span if self._span is not None else self._resolve(state)
        if span.value <= 0:
            return 1.0
        if span.unit == TimeUnit.DURATION:
            return state.elapsed_fraction / span.value
        done = {
            TimeUnit.BATCH: state.timestamp.batch,
            TimeUnit.SAMPLE: self.samples,
            TimeUnit.TOKEN: state.timestamp.token,
        }[span.unit]
        return done / span.value

    def rows(self, state: State, full: int) -> int:
        """Rows of a loaded batch of ``full`` to train at the current point of the run."""
        return warmup_batch_size(
            self.progress(state), full, self.start_fraction, self.stages, self.multiple_of
        )

    # -- events -----------------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        if event == Event.AFTER_TRAIN_BATCH:
            return self._multiplier != 1.0
        if event == Event.BATCH_END:
            return self._scheduled is not None
        return True

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._span = self._resolve(state)
        elif event == Event.AFTER_DATALOADER:
            self._after_dataloader(state, logger)
        elif event == Event.AFTER_TRAIN_BATCH:
            groups = state.optimizer.param_groups
            self._scheduled = [group["lr"] for group in groups]
            for group in groups:
                group["lr"] = group["lr"] * self._multiplier
        else:  # BATCH_END
            # speedup's LR schedulers are closed-form LambdaLRs: their step, just taken, set
            # the next scheduled LR from the step count. Without one the LR would stay scaled.
            closed_form = bool(state.schedulers) and all(
                isinstance(s, torch.optim.lr_scheduler.LambdaLR) for s in state.schedulers
            )
            if not closed_form:
                for group, lr in zip(state.optimizer.param_groups, self._scheduled):
                    group["lr"] = lr
            self._scheduled = None

    def _after_dataloader(self, state: State, logger: Logger) -> None:
        full = state.batch_size()
        rows = self.rows(state, full)
        if rows < full:
            state.batch = first_rows(state.batch, rows)
        self._multiplier = lr_multiplier(rows, full, self.lr_power)
        world = distributed.world_size()
        self.samples += rows * world
        if (rows, self._multiplier) != self._logged:  # one record per change of stage
            logger.log_metrics(
                {
                    "batch_size_warmup/batch_size": float(rows * world),
                    "batch_size_warmup/lr_multiplier": self._multiplier,
                }
            )
            self._logged = (rows, self._multiplier)

    # -- resume -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        # The step, tokens and data position are the trainer's; the trained samples are ours.
        return {"samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.samples = int(state.get("samples", 0))
        self._scheduled = None
        self._logged = None
