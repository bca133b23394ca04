"""A short real run fires DESIGN.md's events in order, with the right counts."""

from collections import Counter

import torch
from conftest import loaders, make_blobs, tiny_model

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.callback import Callback
from speedup.event import Event
from speedup.time import Time
from speedup.trainer import Trainer

E = Event
MICRO = [
    E.BEFORE_FORWARD,
    E.AFTER_FORWARD,
    E.BEFORE_LOSS,
    E.AFTER_LOSS,
    E.BEFORE_BACKWARD,
    E.AFTER_BACKWARD,
]
EVAL = [
    E.EVAL_START,
    *[E.EVAL_BATCH_START, E.EVAL_BEFORE_FORWARD, E.EVAL_AFTER_FORWARD, E.EVAL_BATCH_END] * 2,
    E.EVAL_END,
]


class EveryEvent(Algorithm):
    name = "every_event"

    def declare(self):
        return Declaration({event: Access() for event in Event})

    def apply(self, event, state, logger):
        pass


class RecordAll(Callback):
    def __init__(self):
        self.events = []
        for event in Event:
            setattr(self, event.value, lambda state, logger, e=event: self.events.append(e))

    def hooks(self):
        return {event: getattr(self, event.value) for event in Event}


def expected_events(epochs=2, batches=4, microbatches=2, eval_every=3):
    out = [E.INIT, E.AFTER_LOAD, E.FIT_START]
    step = 0
    for _ in range(epochs):
        out.append(E.EPOCH_START)
        for _ in range(batches):
            step += 1
            out += [E.BEFORE_DATALOADER, E.AFTER_DATALOADER, E.BATCH_START, E.BEFORE_TRAIN_BATCH]
            out += MICRO * microbatches
            out += [E.AFTER_TRAIN_BATCH, E.BATCH_END]
            if step % eval_every == 0:
                out += EVAL
            out.append(E.BATCH_CHECKPOINT)
        out += [E.EPOCH_END, E.EPOCH_CHECKPOINT]
    if step % eval_every:
        out += EVAL  # the final state is always evaluated
    return out + [E.FIT_END]


def test_event_order_and_counts_of_a_real_run():
    train, evaluation = loaders(make_blobs(n=64), batch_size=16)  # 4 batches/epoch, 2 eval batches
    recorder = RecordAll()
    trainer = Trainer(
        tiny_model(),
        train,
        "2ep",
        eval_dataloader=evaluation,
        algorithms=[EveryEvent()],
        callbacks=[recorder],
        microbatch_size=8,
        eval_interval="3ba",
        trace=True,
    )
    trainer.fit()
    expected = expected_events()
    assert recorder.events == expected
    counts = Counter(recorder.events)
    assert counts[E.BEFORE_FORWARD] == 16  # 8 batches x 2 microbatches
    assert counts[E.BATCH_END] == 8 and counts[E.EPOCH_END] == 2
    assert counts[E.EVAL_START] == 3  # after batches 3 and 6, and at the end
    assert counts[E.EVAL_BATCH_START] == 6

    # The engine's trace: at every event the algorithm runs, then the callback.
    trace = trainer.engine.trace
    assert [e for e, _ in trace[::2]] == [e.value for e in expected]
    assert {who for _, who in trace[::2]} == {"every_event"}
    assert {who for _, who in trace[1::2]} == {"RecordAll"}


def test_epoch_eval_interval_fires_after_epoch_end():
    train, evaluation = loaders(make_blobs(n=64), batch_size=16)
    recorder = RecordAll()
    Trainer(
        tiny_model(),
        train,
        "2ep",
        eval_dataloader=evaluation,
        callbacks=[recorder],
        eval_interval="1ep",
    ).fit()
    events = recorder.events
    ends = [i for i, e in enumerate(events) if e == E.EPOCH_END]
    assert all(events[i + 1] == E.EVAL_START for i in ends)
    assert Counter(events)[E.EVAL_START] == 2  # no extra final eval: the end was evaluated


def test_stop_training_ends_after_current_batch():
    class StopAt(Callback):
        def batch_end(self, state, logger):
            if state.timestamp.batch == 3:
                state.stop_training("enough")

    train, evaluation = loaders(make_blobs(n=64), batch_size=16)
    trainer = Trainer(tiny_model(), train, "10ep", eval_dataloader=evaluation, callbacks=[StopAt()])
    trainer.fit()
    assert trainer.state.timestamp.batch == 3
    assert trainer.state.stop_reason == "enough"
    assert trainer.state.eval_metrics  # the stopped state still gets its final evaluation


class SeesAfterLoad(Callback):
    """Records what AFTER_LOAD sees: the step and the first weight, once per firing."""

    def __init__(self):
        self.seen = []

    def after_load(self, state, logger):
        first = next(state.model.parameters())
        self.seen.append((state.timestamp.batch, first.detach().clone()))


def test_after_load_fires_once_after_the_checkpoint_is_loaded(tmp_path):
    train, evaluation = loaders(make_blobs(n=64), batch_size=16)
    first = Trainer(tiny_model(), train, "3ba", eval_dataloader=evaluation)
    first.fit()
    saved = first.save_checkpoint(tmp_path)
    trained = next(first.state.model.parameters()).detach().clone()

    # Resume: a fresh trainer (fresh weights) loads the checkpoint, then fits.
    train, evaluation = loaders(make_blobs(n=64), batch_size=16)
    watcher = SeesAfterLoad()
    resumed = Trainer(
        tiny_model(seed=1), train, "5ba", eval_dataloader=evaluation, callbacks=[watcher]
    )
    assert watcher.seen == []  # not at construction: nothing is loaded yet
    resumed.load_checkpoint(saved)
    resumed.fit()
    assert len(watcher.seen) == 1
    step, weight = watcher.seen[0]
    assert step == 3 and torch.equal(weight, trained)  # it saw the loaded state

    # Fresh start: once, at the first fit, with step 0; a second fit does not fire it again.
    fresh_watcher = SeesAfterLoad()
    fresh = Trainer(tiny_model(), train, "2ba", callbacks=[fresh_watcher])
    fresh.fit()
    fresh.state.max_duration = Time.parse("4ba")
    fresh.fit()
    assert [s for s, _ in fresh_watcher.seen] == [0]
