"""The events the Trainer fires, in order, each with its contract.

One fit runs::

    INIT                                   (Trainer construction, once)
    AFTER_LOAD                             (first fit(), after any checkpoint loaded; once)
    FIT_START
    per epoch:
        EPOCH_START
        per batch:
            BEFORE_DATALOADER, AFTER_DATALOADER, BATCH_START, BEFORE_TRAIN_BATCH
            per microbatch:
                BEFORE_FORWARD, AFTER_FORWARD, BEFORE_LOSS, AFTER_LOSS,
                BEFORE_BACKWARD, AFTER_BACKWARD
            AFTER_TRAIN_BATCH              (grads ready; before optimizer.step)
            BATCH_END                      (after step and scheduler)
            [eval block]                   (when a batch-unit eval interval is due)
            BATCH_CHECKPOINT
        EPOCH_END
        [eval block]                       (when an epoch-unit eval interval is due)
        EPOCH_CHECKPOINT
    [eval block]                           (at the end if the last state was not evaluated)
    FIT_END

    eval block: EVAL_START, per eval batch (EVAL_BATCH_START, EVAL_BEFORE_FORWARD,
                EVAL_AFTER_FORWARD, EVAL_BATCH_END), EVAL_END

``tests/test_event_trace.py`` records a real run and checks this order and the counts.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Event"]


class Event(str, Enum):
    """A point in training where algorithms, then callbacks, then loggers run."""

    INIT = "init"
    """Once, in ``Trainer.__init__``, after the State exists and before the optimizer is
    built from the model's parameters. Model surgery happens here: an algorithm may replace
    modules (``model.modules``); the optimizer and schedulers are created afterwards, so
    param groups always see the final modules. No batch, no grads, model on the host."""

    AFTER_LOAD = "after_load"
    """Once, at the start of the Trainer's first ``fit()``: after the optimizer and
    schedulers are built and after any checkpoint was loaded (``Trainer.load_checkpoint``, the
    resume of ``speedup run``), before ``torch.compile`` and before FIT_START. On a fresh start
    it fires at the same point, with nothing loaded. The model is on its training device.
    An algorithm may wrap the optimizer or restore state that depends on loaded weights."""

    FIT_START = "fit_start"
    """At the start of each ``fit()``. Dataloaders are built, ``state.max_duration`` and the
    time converter are final. No batch yet. Dataset-level transforms may be installed here."""

    EPOCH_START = "epoch_start"
    """At the start of each epoch, before the dataloader iterator is created; the sampler's
    epoch is set. No batch. A run resumed mid-epoch fires it again for that epoch (but never a
    second EPOCH_END), so what an algorithm does here must be idempotent within an epoch."""

    BEFORE_DATALOADER = "before_dataloader"
    """Before the next batch is drawn. ``state.batch`` still holds the previous batch (or
    None); it must not be relied on."""

    AFTER_DATALOADER = "after_dataloader"
    """The new batch is in ``state.batch``, already on the training device, full size (not yet
    split into microbatches). Batch-level augmentation (resizing, mixing) writes here."""

    BATCH_START = "batch_start"
    """Right after AFTER_DATALOADER; the batch is final. Read-only by convention: loggers
    and timers use it."""

    BEFORE_TRAIN_BATCH = "before_train_batch"
    """Before gradients are zeroed and the microbatch loop runs. The model is in train mode."""

    BEFORE_FORWARD = "before_forward"
    """Per microbatch: ``state.batch`` holds the microbatch (on device). An algorithm may
    change the inputs or the model's mode for this forward."""

    AFTER_FORWARD = "after_forward"
    """Per microbatch: ``state.outputs`` holds the model outputs (inside autocast)."""

    BEFORE_LOSS = "before_loss"
    """Per microbatch: outputs exist, the loss does not. Targets may be rewritten here
    (label smoothing, mixing)."""

    AFTER_LOSS = "after_loss"
    """Per microbatch: ``state.loss`` is the microbatch's mean loss, unscaled. An algorithm may
    replace it (loss interpolation); the trainer scales it by microbatch/batch size for
    backward afterwards."""

    BEFORE_BACKWARD = "before_backward"
    """Per microbatch: just before ``backward``. ``state.loss`` is final."""

    AFTER_BACKWARD = "after_backward"
    """Per microbatch: this microbatch's gradients have been accumulated into ``.grad``."""

    AFTER_TRAIN_BATCH = "after_train_batch"
    """All microbatches done: ``.grad`` holds the full batch's gradient (unscaled when a
    GradScaler is used), before ``optimizer.step()``. Gradient clipping and masking go here."""

    BATCH_END = "batch_end"
    """After ``optimizer.step()``, the scheduler step and the timestamp advance. Weights are
    updated; grads are zeroed. Weight masking and averaging (EMA) go here."""

    BATCH_CHECKPOINT = "batch_checkpoint"
    """After BATCH_END and after any evaluation for this batch: metrics are fresh; a
    checkpoint written here captures a consistent state. The training clock is paused (saving
    is not training). At the last batch of an epoch, the checkpoint saver waits for
    EPOCH_CHECKPOINT so that a resumed run never repeats the epoch's end."""

    EPOCH_END = "epoch_end"
    """After the last batch of an epoch and the epoch counter advance."""

    EPOCH_CHECKPOINT = "epoch_checkpoint"
    """After EPOCH_END and any epoch evaluation; the training clock is paused."""

    EVAL_START = "eval_start"
    """Before an evaluation pass: model in eval mode, grads disabled, training clock paused.
    An algorithm may swap in evaluation weights (EMA) and restore them at EVAL_END."""

    EVAL_BATCH_START = "eval_batch_start"
    """An eval batch is in ``state.batch`` on the device."""

    EVAL_BEFORE_FORWARD = "eval_before_forward"
    """Just before the eval forward."""

    EVAL_AFTER_FORWARD = "eval_after_forward"
    """``state.outputs`` holds the eval outputs."""

    EVAL_BATCH_END = "eval_batch_end"
    """The batch's metrics are accumulated."""

    EVAL_END = "eval_end"
    """``state.eval_metrics`` holds the finished metrics of this pass; the model is about to go
    back to train mode and the training clock resumes."""

    FIT_END = "fit_end"
    """After the last batch and the final evaluation. State is final; an algorithm must not
    change training state here (it would not be checkpointed)."""

    @property
    def is_after(self) -> bool:
        return self.value.startswith(("after_", "eval_after_"))

    @property
    def is_eval(self) -> bool:
        return self.value.startswith("eval_")

    @property
    def is_microbatch(self) -> bool:
        return self in _MICROBATCH_EVENTS


_MICROBATCH_EVENTS = frozenset(
    {
        Event.BEFORE_FORWARD,
        Event.AFTER_FORWARD,
        Event.BEFORE_LOSS,
        Event.AFTER_LOSS,
        Event.BEFORE_BACKWARD,
        Event.AFTER_BACKWARD,
    }
)
