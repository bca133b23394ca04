import json
import math

import pytest
import torch
from conftest import loaders, make_blobs, plan_of
from speedup.algorithms.magnitude_pruning import MagnitudePruning
from speedup.algorithms.rewinding import Rewinding, replayed_step
from speedup.benchmarks.lr_trace import main as lr_trace_main
from speedup.lottery.imp import IMPSettings, run_imp
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.callback import Callback
from speedup.cli import main
from speedup.config import ConfigError, load_config
from speedup.event import Event
from speedup.models import Classifier
from speedup.run import plan_config
from speedup.trainer import Trainer


def model():
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)), 4)


class Snap(Callback):
    """Copies the weights at chosen batch counts; callbacks run after the algorithms at an
    event, so this sees the weights the algorithms left."""

    def __init__(self, at):
        self.at, self.weights = set(at), {}

    def fit_start(self, state, logger):
        if 0 in self.at:
            self.weights[0] = {k: v.clone() for k, v in state.model.state_dict().items()}

    def batch_end(self, state, logger):
        if state.timestamp.batch in self.at:
            self.weights[state.timestamp.batch] = {
                k: v.clone() for k, v in state.model.state_dict().items()
            }


@pytest.mark.parametrize("to", [0, 5])
def test_weight_rewind_restores_survivors_bit_for_bit(to):
    pruning = MagnitudePruning(sparsity=0.7, at="20ba", scope="layerwise")
    rewinding = Rewinding(mode="weights", to=f"{to}ba")
    snap = Snap(at=[to, 20])
    train, _ = loaders(make_blobs(n=64), batch_size=8)
    Trainer(
        model(),
        train,
        "25ba",
        algorithms=[pruning, rewinding],
        callbacks=[snap],
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
    ).fit()
    before, after = snap.weights[to], snap.weights[20]
    for name, mask in pruning.masks.items():
        assert torch.equal(after[name][mask], before[name][mask])  # survivors: the snapshot
        assert torch.all(after[name][~mask] == 0)  # pruned: zero
    assert torch.equal(after["net.0.bias"], before["net.0.bias"])  # unpruned tensors rewind too


class LRTap(Callback):
    """The LR each training step uses (read before the step) and the LR the run ends with."""

    def __init__(self):
        self.lrs, self.final = [], None

    def before_train_batch(self, state, logger):
        self.lrs.append(state.optimizer.param_groups[0]["lr"])

    def fit_end(self, state, logger):
        self.final = state.optimizer.param_groups[0]["lr"]


def run_lrs(algorithms, steps=40, scheduler=None, lr=1.0, tap=None):
    tap = tap or LRTap()
    train, _ = loaders(make_blobs(n=64), batch_size=8)
    Trainer(
        model(),
        train,
        f"{steps}ba",
        algorithms=algorithms,
        callbacks=[tap],
        optimizer={"name": "sgd", "lr": lr},
        scheduler={"name": "cosine", "warmup": "4ba"} if scheduler is None else scheduler,
    ).fit()
    return tap.lrs


# -- the schedules' definitions, written out here independently of speedup.optim -------------

T, P = 40, 20  # run length and pruning step, in batches


def cosine(s):  # Loshchilov & Hutter 2017, one cycle over T steps, down to 0
    return 0.5 * (1 + math.cos(math.pi * min(s, T) / T))


def cosine_warmup(s, w=4):  # linear warmup over w steps ((s + 1) / w), then cosine to 0
    if s < w:
        return min(1.0, (s + 1) / w)
    return 0.5 * (1 + math.cos(math.pi * (min(s, T) - w) / (T - w)))


def linear(s):
    return 1.0 - min(s, T) / T


def multistep(s):  # x0.1 at 10ba and at 30ba (no replayed step lands on a milestone exactly)
    return 0.1 ** ((s >= 10) + (s >= 30))


SCHEDULES = {
    "cosine": ({"name": "cosine"}, cosine),
    "cosine_warmup": ({"name": "cosine", "warmup": "4ba"}, cosine_warmup),
    "linear": ({"name": "linear"}, linear),
    "multistep": ({"name": "multistep", "milestones": ["10ba", "30ba"]}, multistep),
}


def tail_position(k, to, steps_left):
    """Renda et al.: the retrain starts at the schedule's value at the rewind point ``to`` and
    ends at its end; its k-th of ``steps_left`` steps is that far along the tail [to, T]."""
    return to + (T - to) * (k / steps_left)


@pytest.mark.parametrize("mode", ["lr", "weights"])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_retrain_follows_the_schedule_tail_and_ends_at_its_final_value(schedule, mode):
    spec, reference = SCHEDULES[schedule]
    to = 2 if schedule == "cosine_warmup" else 6  # inside the warmup: the replay warms up again
    tap = LRTap()
    lrs = run_lrs(
        [MagnitudePruning(sparsity=0.5, at=f"{P}ba"), Rewinding(mode=mode, to=f"{to}ba")],
        scheduler=spec,
        lr=0.5,
        tap=tap,
    )
    assert len(lrs) == T
    for b in range(P):  # the dense phase is the configured schedule
        assert lrs[b] == pytest.approx(0.5 * reference(b), rel=1e-12, abs=1e-15)
    for k in range(T - P):  # the retrain follows the tail [to, T], compressed into [P, T]
        expected = 0.5 * reference(tail_position(k, to, T - P))
        assert lrs[P + k] == pytest.approx(expected, rel=1e-12, abs=1e-15), k
    assert lrs[P] == pytest.approx(0.5 * reference(to), rel=1e-12)  # starts at the rewind point
    # ... and ends where the schedule ends, as the run without pruning does
    plain = LRTap()
    run_lrs([], scheduler=spec, lr=0.5, tap=plain)
    assert tap.final == pytest.approx(0.5 * reference(T), abs=1e-15)
    assert tap.final == pytest.approx(plain.final, abs=1e-15)
    if schedule != "cosine_warmup":  # no warmup in the tail: the retrain only anneals
        retrain = lrs[P:] + [tap.final]
        assert all(a >= b for a, b in zip(retrain, retrain[1:], strict=False))
    if schedule == "multistep":  # both milestones of the tail, at the compressed steps:
        # the tail [6, 40] runs 1.7 schedule steps per retrain step, so 10ba falls at P + 2.35
        # and 30ba at P + 14.1; the first retrain steps past them take the drops
        assert lrs[-1] == plain.lrs[-1] == pytest.approx(0.5 * 0.01)
        assert lrs[P] == pytest.approx(0.5) and lrs[P + 2] == pytest.approx(0.5)
        assert lrs[P + 3] == pytest.approx(0.05) and lrs[P + 14] == pytest.approx(0.05)
        assert lrs[P + 15] == pytest.approx(0.005)


def test_the_issue_case_anneals_where_the_old_replay_stopped_at_42_percent():
    """Pruned at half of a cosine run, rewound to 5% of it: the retrain used to replay
    S(0.05T .. 0.55T) and end at 42% of the peak LR; it now ends at the schedule's end, 0."""
    tap = LRTap()
    lrs = run_lrs(
        [MagnitudePruning(sparsity=0.5, at="0.5dur"), Rewinding(mode="lr", to="0.05dur")],
        scheduler={"name": "cosine"},
        tap=tap,
    )
    assert lrs[P] == pytest.approx(cosine(2))  # 0.05 * 40 = step 2
    assert cosine(2 + (T - P)) == pytest.approx(0.42178, abs=1e-5)  # where the old replay was
    assert lrs[-1] < 0.01 and tap.final == pytest.approx(0.0, abs=1e-15)


def test_replayed_step_maps_the_tail_onto_the_steps_left():
    # pruned at 60 of 100, rewound to 10: the 40 steps left replay the 90 steps of the tail
    assert replayed_step(60, 60, 10, 100) == 10
    assert replayed_step(80, 60, 10, 100) == 55  # halfway through the retrain, and the tail
    assert replayed_step(100, 60, 10, 100) == 100
    assert replayed_step(61, 60, 10, 100) == pytest.approx(10 + 90 / 40)
    assert [replayed_step(b, 60, 60, 100) for b in (60, 73, 100)] == [60, 73, 100]  # to == P
    assert replayed_step(100, 100, 10, 100) == 100  # pruned at the very end


def test_lr_rewinding_resumes_from_a_checkpoint_mid_retrain(tmp_path):
    spec = {"name": "cosine", "warmup": "4ba"}

    def trainer(callbacks):
        train, _ = loaders(make_blobs(n=64), batch_size=8)
        algorithms = [MagnitudePruning(sparsity=0.5, at=f"{P}ba"), Rewinding(mode="lr", to="3ba")]
        return Trainer(
            model(), train, f"{T}ba", algorithms=algorithms, callbacks=callbacks,
            optimizer={"name": "sgd", "lr": 1.0}, scheduler=spec,
        )  # fmt: skip

    whole = LRTap()
    trainer([whole]).fit()

    class StopAt30(Callback):
        def batch_end(self, state, logger):
            if state.timestamp.batch == 30:
                state.stop_training("test")

    first = trainer([StopAt30()])
    first.fit()
    path = first.save_checkpoint(tmp_path)
    resumed = LRTap()
    second = trainer([resumed])
    second.load_checkpoint(path)
    rewinding = next(a for a in second.state.algorithms if a.name == "rewinding")
    assert rewinding.retrain_from == P
    second.fit()
    assert resumed.lrs == whole.lrs[30:] and resumed.final == whole.final


def test_lottery_lr_rewinding_levels_retrain_on_the_last_steps_of_the_schedule(tmp_path, capsys):
    """A lottery level is its own run from the rewind point k to T: its LR is the original
    schedule's at the same steps (Renda et al.'s last T - k steps), ending at its final value.
    Read from each level's metrics.jsonl, logged after every step."""
    tiny = ["max_duration=6ba", "data.train_samples=256", "data.eval_samples=128"]
    tiny += ["data.batch_size=32", "progress_bar=false", "log_interval=1ba"]
    cfg = load_config("quickstart", [*tiny, "scheduler.warmup=0ba", "optimizer.lr=0.01"])
    run_imp(cfg, tmp_path, IMPSettings(levels=1, mode="lr", rewind="2ba", controls=()))
    for level in (0, 1):
        lrs, metrics = {}, tmp_path / f"level_{level}" / "main" / "metrics.jsonl"
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "lr" in record:
                lrs[record["step"]] = record["lr"]
        # logged after step s: the LR of the next step, 0.01 * cosine(s) over 6 steps
        expected = {s: 0.01 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in (3, 4, 5, 6)}
        assert lrs == pytest.approx(expected, abs=1e-15)
        assert lrs[6] == 0.0
    # the measuring script reads the same traces back, with the schedule's own end beside them
    assert lr_trace_main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    levels = [ln for ln in lines if "/main " in ln]
    assert len(levels) == 2
    for line in levels:
        assert "steps=3..6" in line and "lr_last=0 schedule_end=0 peak=0.01" in line


@pytest.mark.parametrize(
    ("scheduler", "final_factor"),
    [
        ({"name": "cosine", "alpha_f": 0.1}, 0.1),  # cosine down to 10% of the peak
        ({"name": "multistep", "milestones": ["10ba", "30ba"]}, 0.01),
        ({"name": "constant"}, 1.0),
    ],
)
def test_finetune_trains_at_the_original_schedules_final_lr(scheduler, final_factor):
    plain = run_lrs([], scheduler=scheduler, lr=0.5)
    lrs = run_lrs(
        [MagnitudePruning(sparsity=0.5, at=f"{P}ba"), Rewinding(mode="finetune")],
        scheduler=scheduler,
        lr=0.5,
    )
    assert lrs[:P] == plain[:P]
    assert lrs[P:] == pytest.approx([0.5 * final_factor] * (T - P), rel=1e-12)


def test_finetune_uses_an_explicit_constant_lr():
    lrs = run_lrs(
        [MagnitudePruning(sparsity=0.5, at="20ba"), Rewinding(mode="finetune", finetune_lr=0.003)]
    )
    assert lrs[20:] == [0.003] * 20


@pytest.mark.parametrize("scheduler", [{"name": "cosine", "warmup": "4ba"}, {"name": "linear"}])
def test_finetune_refuses_a_schedule_that_ends_at_zero_before_training(scheduler):
    train, _ = loaders(make_blobs(n=64), batch_size=8)
    algorithms = [MagnitudePruning(sparsity=0.5, at="20ba"), Rewinding(mode="finetune")]
    trainer = Trainer(model(), train, "40ba", algorithms=algorithms, scheduler=scheduler)
    with pytest.raises(ConfigError) as raised:
        trainer.fit()
    message = str(raised.value)
    assert "algorithms.rewinding.finetune_lr:" in message and "\n" not in message
    assert f"the {scheduler['name']} schedule ends at LR 0;" in message
    assert trainer.state.timestamp.batch == 0  # nothing trained


class WallClockPruner(Algorithm):
    """A plugin pruner that works in a wall-clock run (magnitude_pruning's Times need steps)."""

    name = "test_wall_clock_pruner"

    def declare(self):
        return Declaration(events={Event.BATCH_END: Access(writes={"masks"})})

    def apply(self, event, state, logger):
        pass


def test_a_wall_clock_run_has_no_schedule_end_to_rewind_towards():
    train, _ = loaders(make_blobs(n=64), batch_size=8)
    algorithms = [WallClockPruner(), Rewinding(mode="lr", to="2ba")]
    trainer = Trainer(model(), train, "5sec", algorithms=algorithms, scheduler={"name": "cosine"})
    with pytest.raises(ConfigError, match="max_duration=5sec is wall-clock, so the cosine"):
        trainer.fit()
    assert trainer.state.timestamp.batch == 0


def test_cli_finetune_at_zero_final_lr_exits_2(capsys):
    code = main(
        [
            "run",
            "quickstart",
            "max_duration=6ba",
            "data.train_samples=256",
            "data.eval_samples=128",
            "progress_bar=false",
            "algorithms.magnitude_pruning.at=3ba",
            "algorithms.rewinding.mode=finetune",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "algorithms.rewinding.finetune_lr: mode finetune trains at the original" in err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("algorithms.rewinding.finetune_lr=0.01", "finetune_lr is the LR of mode finetune only"),
        ("algorithms.rewinding.mode=finetune", None),
        ("algorithms.rewinding.to=5sec", "rewinding.to: 5sec is wall-clock"),
    ],
)
def test_rewinding_arguments_are_validated(override, expected):
    overrides = ["algorithms.magnitude_pruning={}", override]
    if expected is None:  # a finetune_lr of 0 or below, or not a number
        for bad, needle in [("0", "must be a finite LR > 0"), ("-1e-3", "> 0"), ("fast", "type")]:
            with pytest.raises(ConfigError, match=needle):
                load_config("quickstart", [*overrides, f"algorithms.rewinding.finetune_lr={bad}"])
        return
    with pytest.raises(ConfigError, match=expected):
        load_config("quickstart", overrides)


def test_rewind_point_after_pruning_is_a_plan_error():
    algorithms = [MagnitudePruning(at="100ba"), Rewinding(to="200ba")]
    plan = plan_of(algorithms)
    assert [c.kind for c in plan.conflicts] == ["invalid"]
    assert "to=200ba is later than magnitude_pruning's first pruning at 100ba" in str(
        plan.conflicts[0]
    )
    plan, _ = plan_config(load_config("quickstart", ["algorithms.rewinding={}"]))
    assert "rewinding: needs a pruning algorithm" in str(plan.conflicts[0])


def test_bad_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="rewinding.mode must be one of weights, lr, finetune"):
        load_config("quickstart", ["algorithms.rewinding.mode=rewind"])


def test_rewind_after_pruning_in_other_units_fails_at_fit_start():
    train, _ = loaders(make_blobs(n=64), batch_size=8)  # 8 batches per epoch
    algorithms = [MagnitudePruning(at="10ba"), Rewinding(to="2ep")]
    trainer = Trainer(model(), train, "30ba", algorithms=algorithms)  # plan: units differ
    with pytest.raises(ConfigError, match="to=2ep is later than magnitude_pruning's first"):
        trainer.fit()
