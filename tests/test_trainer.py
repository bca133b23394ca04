"""The training loop's behaviour: accumulation, seeding, schedules, precision, clocks."""

import pytest
import torch
from conftest import loaders, make_blobs, tiny_model

from speedup.callback import Callback
from speedup.trainer import Trainer


class GradTap(Callback):
    """Copies the gradients as the optimizer will see them."""

    def __init__(self):
        self.grads = []

    def after_train_batch(self, state, logger):
        self.grads.append([p.grad.clone() for p in state.model.parameters()])


class LRTap(Callback):
    def __init__(self):
        self.lrs = []

    def before_train_batch(self, state, logger):
        self.lrs.append(state.optimizer.param_groups[0]["lr"])


def test_learns_separable_data():
    data = make_blobs(n=256)
    train, evaluation = loaders(data, batch_size=32)
    trainer = Trainer(
        tiny_model(),
        train,
        "15ep",
        eval_dataloader=evaluation,
        optimizer={"name": "adam", "lr": 0.01},
    )
    metrics = trainer.fit()
    assert metrics["accuracy"] > 0.95
    assert metrics["loss"] < 0.3


def assert_microbatches_of_16_give_the_whole_batchs_gradient(n: int) -> None:
    """One step on a batch of ``n`` accumulates, over microbatches of 16, the gradient that
    the whole batch gives at once."""
    data = make_blobs(n=n)
    grads = {}
    for micro in (None, 16):
        tap = GradTap()
        train, _ = loaders(data, batch_size=n)
        Trainer(tiny_model(seed=3), train, "1ba", microbatch_size=micro, callbacks=[tap]).fit()
        grads[micro] = tap.grads[0]
    for whole, accumulated in zip(grads[None], grads[16], strict=True):
        torch.testing.assert_close(accumulated, whole, atol=1e-6, rtol=0)


def test_microbatches_4x16_give_the_gradient_of_one_batch_of_64():
    assert_microbatches_of_16_give_the_whole_batchs_gradient(64)


def test_uneven_microbatches_are_weighted_by_size():
    assert_microbatches_of_16_give_the_whole_batchs_gradient(40)  # 16 + 16 + 8


def _final_weights(seed, deterministic=False):
    data = make_blobs(n=128)
    train, evaluation = loaders(data, batch_size=16, seed=seed)
    torch.manual_seed(seed)
    model = tiny_model(seed=seed)
    Trainer(
        model,
        train,
        "3ep",
        eval_dataloader=evaluation,
        seed=seed,
        deterministic=deterministic,
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
        microbatch_size=8,
    ).fit()
    return [p.detach().clone() for p in model.parameters()]


def test_same_seed_gives_bit_identical_weights():
    first, second = _final_weights(5, deterministic=True), _final_weights(5, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other = _final_weights(6)
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def _lrs(scheduler, duration, ratio=1.0, n=64, batch_size=8):
    tap = LRTap()
    train, _ = loaders(make_blobs(n=n), batch_size=batch_size)
    Trainer(
        tiny_model(),
        train,
        duration,
        optimizer={"name": "sgd", "lr": 1.0},
        scheduler=scheduler,
        callbacks=[tap],
        scale_schedule_ratio=ratio,
    ).fit()
    return tap.lrs


def test_scale_schedule_ratio_stretches_cosine_exactly():
    base = _lrs({"name": "cosine", "alpha_f": 0.1}, "5ep")  # 40 batches
    stretched = _lrs({"name": "cosine", "alpha_f": 0.1}, "5ep", ratio=2.0)
    assert len(base) == 40 and len(stretched) == 80
    for t, lr in enumerate(base):
        assert stretched[2 * t] == pytest.approx(lr, abs=1e-12)
    halved = _lrs({"name": "cosine", "alpha_f": 0.1}, "6ep", ratio=0.5)  # 24 batches
    assert len(halved) == 24
    assert halved[-1] == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(23 / 24 * torch.pi)).item())
    )


def test_schedule_shapes():
    cosine = _lrs({"name": "cosine"}, "40ba")
    assert cosine[0] == 1.0 and cosine[20] == pytest.approx(0.5) and cosine[-1] < 0.01
    linear = _lrs({"name": "linear", "start_factor": 1.0, "end_factor": 0.0}, "40ba")
    assert linear[10] == pytest.approx(0.75)
    step = _lrs({"name": "step", "step_size": "10ba", "gamma": 0.5}, "40ba")
    assert step[9] == 1.0 and step[10] == 0.5 and step[35] == 0.125
    multi = _lrs({"name": "multistep", "milestones": ["1ep", "30ba"], "gamma": 0.1}, "40ba")
    assert multi[7] == 1.0 and multi[8] == pytest.approx(0.1) and multi[30] == pytest.approx(0.01)
    warm = _lrs({"name": "cosine", "warmup": "0.25dur"}, "40ba")
    assert warm[0] == pytest.approx(0.1) and warm[9] == pytest.approx(1.0)
    assert warm[10] == pytest.approx(1.0) and warm[-1] < 0.01
    ssr_warm = _lrs({"name": "constant", "warmup": "10ba"}, "40ba", ratio=2.0)
    assert ssr_warm[9] == 1.0  # warmup is not stretched by default


def test_optimizers_by_name_from_torch_and_torch_optimizer():
    train, _ = loaders(make_blobs(n=32), batch_size=16)
    for spec, cls_name in (
        ({"name": "AdamW", "lr": 1e-3, "betas": [0.9, 0.95]}, "AdamW"),
        ({"name": "lamb", "lr": 1e-3}, "Lamb"),
    ):
        trainer = Trainer(tiny_model(), train, "1ba", optimizer=spec)
        assert type(trainer.state.optimizer).__name__ == cls_name
    with pytest.raises(ValueError, match="optimizer.momentun.*did you mean 'momentum'"):
        Trainer(tiny_model(), train, "1ba", optimizer={"name": "sgd", "lr": 0.1, "momentun": 0.9})


def test_bf16_autocast_on_cpu():
    class DtypeTap(Callback):
        dtype = None

        def after_forward(self, state, logger):
            self.dtype = state.outputs.dtype

    tap = DtypeTap()
    train, evaluation = loaders(make_blobs(n=32), batch_size=16)
    trainer = Trainer(
        tiny_model(), train, "2ba", eval_dataloader=evaluation, precision="bf16", callbacks=[tap]
    )
    metrics = trainer.fit()
    assert tap.dtype == torch.bfloat16
    assert next(trainer.state.model.parameters()).dtype == torch.float32  # master weights
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_fp16_on_cpu_is_refused():
    train, _ = loaders(make_blobs(n=32), batch_size=16)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Trainer(tiny_model(), train, "1ba", precision="fp16", device="cpu")


class FakeClock:
    """The trainer's clock, moved only by the test: time accounting checked exactly, whatever
    the machine's load. Steps are powers of two, exact in binary floating point."""

    def __init__(self):
        self.now = 1024.0

    def perf_counter(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    import speedup.trainer

    fake = FakeClock()
    monkeypatch.setattr(speedup.trainer, "time", fake)
    return fake


def test_eval_time_is_excluded_from_training_time(clock):
    class Timed(Callback):
        evaluations = 0

        def after_train_batch(self, state, logger):
            clock.advance(0.0625)  # a training step

        def eval_start(self, state, logger):
            self.evaluations += 1
            clock.advance(0.25)  # a slow evaluation

    train, evaluation = loaders(make_blobs(n=32), batch_size=16)
    timed = Timed()
    trainer = Trainer(
        tiny_model(),
        train,
        "4ba",
        eval_dataloader=evaluation,
        eval_interval="1ba",
        callbacks=[timed],
    )
    trainer.fit()
    ts = trainer.state.timestamp
    assert timed.evaluations == 4
    assert ts.eval_time_s == 4 * 0.25
    assert ts.train_time_s == 4 * 0.0625  # the evaluations are not in here


def test_wall_clock_duration_stops_training(clock):
    class Slow(Callback):
        def after_train_batch(self, state, logger):
            clock.advance(0.03125)

    train, _ = loaders(make_blobs(n=64), batch_size=16)
    trainer = Trainer(tiny_model(), train, "0.25sec", callbacks=[Slow()])
    trainer.fit()
    assert trainer.state.timestamp.train_time_s == 0.25
    assert trainer.state.timestamp.batch == 8  # 0.25 s of 1/32 s steps, across two epochs


@pytest.mark.slow
def test_torch_compile_trains():
    train, evaluation = loaders(make_blobs(n=64), batch_size=16)
    trainer = Trainer(
        tiny_model(),
        train,
        "2ep",
        eval_dataloader=evaluation,
        compile=True,
        optimizer={"name": "adam", "lr": 0.01},
    )
    metrics = trainer.fit()
    assert metrics["accuracy"] > 0.5
