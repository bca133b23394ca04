"""Sequence length warmup.

**What.** A curriculum on sequence length: training starts on short sequences and the length
grows linearly to the data's full length over the first ``duration`` of the run, in steps of
``step_size`` tokens, then stays full. With ``L`` the full length, ``W`` the warmup in
batches and ``b`` the batches done, the length of batch ``b`` is

    ``min_seq_length + step_size * floor((L - min_seq_length) * b / (step_size * W))``

for ``b < W``, and ``L`` from then on (:func:`warmup_sequence_length`). Short sequences are
made from the full ones, as Li et al. do: truncated (``truncate=True``, the tail tokens of
the step are dropped) or cut into consecutive segments that become extra rows
(``truncate=False``, every token is kept and the rows multiply). Li, Zhang & He (2022, "The
stability-efficiency dilemma: investigating sequence length warmup for training GPT
models", NeurIPS) trace the loss spikes of large-batch, high-learning-rate GPT-2 pretraining
to extreme gradient variance from long sequences early in training; their warmup removes them.

**When it helps.** Causal or masked LM pretraining from scratch. Li et al. report, on GPT-2
117M and 1.5B, stable training with an 8x larger batch and a 4x larger learning rate where the
baseline diverges, and the same or better zero-shot results with up to 2.2x fewer tokens and
3.7x less wall-clock (abstract). Composer's method card reports ~1.5x to the same loss on
GPT-2 125M with ``duration=0.3`` (the largest that kept full quality), ``min_seq_length=8``
and ``step_size=8`` (its defaults here; multiples of 8 keep tensor cores busy). Early steps
are cheaper (attention is quadratic and the MLP linear in length), so the saving grows with
``duration``. Fine-tuning and classification gain nothing: the data are short already.

**Time in tokens.** The trainer counts the tokens of the batch it trains on, so
``timestamp.token`` counts the truncated tokens, not the loader's (with ``truncate=False``
the two agree up to the dropped remainder). Duration and schedule conversions assume full
batches (``tokens_per_sample``), so a ``tok`` max_duration runs longer than its batch count
suggests; use ``ba`` or ``ep`` durations with this algorithm.

**Composes badly with.** Anything that needs whole sequences at every step (sequence-level
labels survive truncation, but not ``truncate=False``). ALiBi's training-length scaling
reshapes first (declared order), so the warmup then ramps up to the shortened length.
Memory is sized by the final, full length: the first steps never reveal an out-of-memory.

Functional twins: :func:`set_batch_sequence_length`, :func:`warmup_sequence_length`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.time import Time, schedule_time

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["SeqLengthWarmup", "set_batch_sequence_length", "warmup_sequence_length"]

Batch = dict[str, torch.Tensor]


def _sequence_length(batch: Batch) -> int:
    if "input_ids" in batch:
        return int(batch["input_ids"].shape[1])
    for tensor in batch.values():
        if tensor.dim() >= 2:
            return int(tensor.shape[1])
    raise ValueError("the batch has no sequence-shaped tensor ([N, L] or more dimensions)")


def set_batch_sequence_length(batch: Batch, length: int, truncate: bool = True) -> Batch:
    """A batch whose sequences are ``length`` tokens long (a new dict; the input is untouched).

    Sequence-shaped tensors (``[N, L, ...]``, with ``L`` the length of ``input_ids``) are cut
    along dimension 1. ``truncate=True`` keeps the first ``length`` tokens of every row; other
    tensors (one label per sequence) pass unchanged. ``truncate=False`` cuts each row into
    consecutive segments of ``length`` tokens that become rows of their own, row-major, and
    drops the tokens left over at the end of the batch (none when ``length`` divides ``L``);
    there every tensor must be sequence-shaped. A ``length`` at or above ``L`` returns the
    batch as it is.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    full = _sequence_length(batch)
    if length >= full:
        return dict(batch)
    rows = next(iter(batch.values())).shape[0]

    def is_sequence(tensor: torch.Tensor) -> bool:
        return tensor.dim() >= 2 and tensor.shape[0] == rows and tensor.shape[1] == full

    if truncate:
        return {k: v[:, :length].contiguous() if is_sequence(v) else v for k, v in batch.items()}
    kept = rows * full // length * length  # tokens in whole segments
    out = {}
    for key, tensor in batch.items():
        if not is_sequence(tensor):
            raise ValueError(
                f"truncate=False reshapes every tensor into segments, but batch[{key!r}] has "
                f"shape {tuple(tensor.shape)}, not [{rows}, {full}, ...]; use truncate=True"
            )
        flat = tensor.reshape(rows * full, *tensor.shape[2:])[:kept]
        out[key] = flat.reshape(kept // length, length, *tensor.shape[2:])
    return out


def warmup_sequence_length(
    batch: float, warmup_batches: float, full_length: int, min_seq_length: int, step_size: int
) -> int:
    """The sequence length for the batch after ``batch`` batches of training: a linear ramp
    from ``min_seq_length`` reaching ``full_length`` at ``warmup_batches``, rounded down to a
    multiple of ``step_size`` above ``min_seq_length``."""
    if min_seq_length >= full_length or batch >= warmup_batches:
        return full_length
    steps = math.floor((full_length - min_seq_length) * batch / (step_size * warmup_batches))
    return min(full_length, min_seq_length + step_size * steps)


def _multiple_of_8(key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
        raise ValueError(f"seq_length_warmup.{key} must be a positive multiple of 8, got {value}")


class SeqLengthWarmup(Algorithm):
    """Grow the training sequence length linearly from short to full early in training."""

    name = "seq_length_warmup"
    # Li et al. 2022 (Sec. 4): warm up over a fraction of the run from short sequences.
    SEARCH_SPACE = {
        "duration": {"type": "float", "low": 0.1, "high": 0.5, "unit": "dur"},
        "min_seq_length": {"type": "categorical", "choices": [8, 16, 32, 64]},
    }

    def __init__(
        self,
        duration: str = "0.3dur",
        min_seq_length: int = 8,
        step_size: int = 8,
        truncate: bool = True,
    ) -> None:
        parsed = schedule_time("seq_length_warmup.duration", duration)
        _multiple_of_8("min_seq_length", min_seq_length)
        _multiple_of_8("step_size", step_size)
        self.duration = parsed
        self.min_seq_length = min_seq_length
        self.step_size = step_size
        self.truncate = truncate
        #: The warmup in batches, resolved at FIT_START.
        self.warmup_batches: float | None = None
        self._logged_length: int | None = None

    def time_constants(self) -> dict[str, Time]:
        return {"duration": self.duration}  # longer than the run: never trains at full length

    def declare(self) -> Declaration:
        return Declaration(
            events={
                Event.FIT_START: Access(reads={"max_duration"}),
                # Every sequence-shaped key is cut (input_ids, attention_mask, labels, ...).
                Event.AFTER_DATALOADER: Access(reads={"batch", "timestamp"}, writes={"batch"}),
            },
            runs_after={"alibi"},  # ramp up to ALiBi's shortened training length
            data_kinds={"text"},
        )

    def sequence_length(self, batch: int, full_length: int) -> int:
        """The length this schedule gives the batch after ``batch`` batches."""
        assert self.warmup_batches is not None, "resolved at FIT_START"
        return warmup_sequence_length(
            batch, self.warmup_batches, full_length, self.min_seq_length, self.step_size
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            try:
                self.warmup_batches = state.converter.to_batches(self.duration)
            except ValueError as err:
                raise ConfigError(f"algorithms.seq_length_warmup.duration: {err}") from None
            return
        full = _sequence_length(state.batch)
        length = self.sequence_length(state.timestamp.batch, full)
        if length < full:
            state.batch = set_batch_sequence_length(state.batch, length, self.truncate)
        if length != self._logged_length:  # log changes only: one value per step of the ramp
            logger.log_metrics({"seq_length_warmup/seq_length": float(length)})
            self._logged_length = length
