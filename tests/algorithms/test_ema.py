import copy

import pytest
import torch
from conftest import (
    SaveAt,
    bad_arguments_test,
    load_optimizer_and_time,
    loaders,
    make_blobs,
    metrics_records,
    plan_of,
    smoke_run,
    snapshot,
    stand_in,
    through_torch_save,
)
from speedup.algorithms.ema import EMA, compute_ema, smoothing_from_half_life
from speedup.algorithms.label_smoothing import LabelSmoothing
from speedup.algorithms.magnitude_pruning import MagnitudePruning
from speedup.algorithms.progressive_resizing import ProgressiveResizing
from speedup.algorithms.rewinding import Rewinding
from torch import nn

from speedup.algorithm import ALGORITHMS, Access
from speedup.callback import Callback
from speedup.config import ConfigError, load_config
from speedup.event import Event
from speedup.models import Classifier
from speedup.trainer import Trainer

if "ema" not in ALGORITHMS:
    ALGORITHMS.register("ema")(EMA)


def model(seed=0, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 32)] + ([nn.BatchNorm1d(32)] if batchnorm else [])
    net = nn.Sequential(*layers, nn.ReLU(), nn.Linear(32, 4))
    return Classifier(net, 4)


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}


def train(algorithms, steps, callbacks=(), eval_interval="0ba", net=None, **kwargs):
    train_loader, eval_loader = loaders(make_blobs(n=64), batch_size=8)
    trainer = Trainer(
        net or model(batchnorm=True),
        train_loader,
        f"{steps}ba",
        eval_dataloader=eval_loader,
        algorithms=algorithms,
        callbacks=list(callbacks),
        optimizer=kwargs.pop("optimizer", SGD),
        eval_interval=eval_interval,
        **kwargs,
    )
    return trainer, trainer.fit()


# -- the math ---------------------------------------------------------------------------------


def test_compute_ema_matches_a_hand_loop_and_copies_integer_buffers():
    live, ema = model(seed=0, batchnorm=True), model(seed=1, batchnorm=True)
    hand = weights(ema)
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        with torch.no_grad():
            for tensor in live.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(torch.randn(tensor.shape, generator=g))
                else:
                    tensor.add_(step + 1)
        compute_ema(ema, live, 0.9)
        for name, value in live.state_dict().items():
            if value.is_floating_point():
                hand[name] = 0.9 * hand[name] + 0.1 * value
            else:
                hand[name] = value.clone()
    result = weights(ema)
    for name in hand:
        torch.testing.assert_close(result[name], hand[name], rtol=1e-6, atol=1e-6)
    assert int(result["net.1.num_batches_tracked"]) == 15  # copied, not averaged
    # a {name: tensor} mapping works the same as a module
    tensors = {k: v.clone() for k, v in weights(ema).items()}
    compute_ema(tensors, live, 0.5)
    compute_ema(ema, live, 0.5)
    assert_same(tensors, weights(ema))


def test_compute_ema_rejects_bad_smoothing_and_mismatched_names():
    with pytest.raises(ValueError, match="smoothing"):
        compute_ema(model(), model(), 1.5)
    with pytest.raises(ValueError, match="missing"):
        compute_ema({"net.0.weight": torch.zeros(32, 8)}, model(), 0.5)


@pytest.mark.parametrize("interval", [1, 2, 5])
def test_after_one_half_life_a_step_input_is_half_way(interval):
    ema, target = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    smoothing = smoothing_from_half_life(10, interval)
    for _ in range(10 // interval):
        compute_ema(ema, target, smoothing)
    torch.testing.assert_close(ema["w"], torch.full((3,), 0.5))


class StepInput(Callback):
    """Shifts every weight by +1 right after the EMA copied them (lr 0 keeps them there)."""

    def __init__(self, ema, at):
        self.ema, self.at, self.initial, self.seen = ema, at, None, {}

    def fit_start(self, state, logger):
        self.initial = weights(state.model)
        with torch.no_grad():
            for p in state.model.parameters():
                p.add_(1.0)

    def batch_end(self, state, logger):
        if state.timestamp.batch in self.at:
            self.seen[state.timestamp.batch] = {n: t.clone() for n, t in self.ema.ema.items()}


@pytest.mark.parametrize(
    ("half_life", "update_interval", "at"), [("10ba", "1ba", 10), ("80sp", "2ba", 10)]
)
def test_in_a_run_the_average_is_half_way_after_half_life(half_life, update_interval, at):
    ema = EMA(half_life=half_life, update_interval=update_interval)
    step = StepInput(ema, at={at - 1, at})
    train([ema], at, [step], optimizer={"name": "sgd", "lr": 0.0}, net=model())
    for name, start in step.initial.items():
        torch.testing.assert_close(step.seen[at][name], start + 0.5, rtol=0, atol=1e-5)
    if update_interval == "2ba":  # batch 9 is not an update step: the value of batch 8
        torch.testing.assert_close(
            step.seen[at - 1]["net.0.bias"],
            step.initial["net.0.bias"] + 1 - 0.5**0.8,
            rtol=0,
            atol=1e-5,
        )


def test_half_life_resolves_in_any_unit_at_fit_start():
    ema = EMA(half_life="100ba", update_interval="20ba")
    train([ema], 1)
    assert ema.resolved_smoothing == pytest.approx(0.5**0.2)  # Composer's ResNet-50 recipes
    ema = EMA(half_life="1ep", update_interval="2ba")  # 8 batches of 8 per epoch
    train([ema], 1)
    assert ema.resolved_smoothing == pytest.approx(0.5 ** (2 / 8))
    ema = EMA(smoothing=0.99, update_interval="16sp")
    train([ema], 1)
    assert ema.resolved_smoothing == 0.99 and ema.interval_batches == 2


# -- in a run: evaluation and the final model -------------------------------------------------


class Recorder(Callback):
    """Keeps its own hand-rolled average and records what the model holds at each event."""

    def __init__(self, smoothing):
        self.smoothing = smoothing
        self.hand = None
        self.training = {}  # batch -> training weights at BATCH_END
        self.at_eval = []  # (batch, weights seen by the eval forward)
        self.after_eval = []  # (batch, weights after EVAL_END)

    def fit_start(self, state, logger):
        self.hand = weights(state.model)

    def batch_end(self, state, logger):
        self.training[state.timestamp.batch] = weights(state.model)
        compute_ema(self.hand, state.model, self.smoothing)

    def eval_after_forward(self, state, logger):
        if not self.at_eval or self.at_eval[-1][0] != state.timestamp.batch:
            self.at_eval.append((state.timestamp.batch, weights(state.model)))

    def eval_end(self, state, logger):
        self.after_eval.append((state.timestamp.batch, weights(state.model)))


def test_eval_sees_the_average_and_training_resumes_on_the_training_weights():
    ema = EMA(half_life="3ba")
    recorder = Recorder(smoothing=0.5 ** (1 / 3))
    trainer, metrics = train([ema], 12, [recorder], eval_interval="4ba")
    assert [b for b, _ in recorder.at_eval] == [4, 8, 12]
    assert_same(recorder.at_eval[-1][1], recorder.hand)  # the final eval: the average
    for batch, seen in recorder.at_eval:  # never the training weights
        assert not torch.equal(seen["net.0.weight"], recorder.training[batch]["net.0.weight"])
    for batch, after in recorder.after_eval:
        assert_same(after, recorder.training[batch])  # training weights restored exactly
    # at the end the model holds the average; the algorithm holds the training weights
    assert_same(weights(trainer.state.model), recorder.hand)
    assert ema.model_holds_ema
    assert_same(dict(ema.ema), recorder.training[12])
    # the reported metrics are those of the averaged weights
    check = model(batchnorm=True)
    check.load_state_dict(recorder.hand)
    check.eval()
    _, eval_loader = loaders(make_blobs(n=64), batch_size=8)
    with torch.no_grad():
        sums = [check.metrics(check(b), b) for b in eval_loader]
    accuracy = sum(float(s["accuracy"][0]) for s in sums) / 64
    assert metrics["accuracy"] == pytest.approx(accuracy)


def test_every_eval_sees_the_average_of_its_batch():
    ema = EMA(half_life="3ba")
    hands = {}

    class Hand(Recorder):
        def batch_end(self, state, logger):
            super().batch_end(state, logger)
            hands[state.timestamp.batch] = copy.deepcopy(self.hand)

    recorder = Hand(smoothing=0.5 ** (1 / 3))
    train([ema], 12, [recorder], eval_interval="4ba")
    for batch, seen in recorder.at_eval:
        assert_same(seen, hands[batch])


def test_eval_swaps_leave_training_bit_identical():
    runs = {}
    for name, algorithms, interval in [
        ("plain", [], "0ba"),
        ("ema", [EMA(half_life="3ba", update_interval="2ba")], "0ba"),
        ("ema+evals", [EMA(half_life="3ba", update_interval="2ba")], "1ba"),
    ]:
        recorder = Recorder(smoothing=0.5)
        train(algorithms, 10, [recorder], eval_interval=interval)
        runs[name] = recorder.training
    for batch in range(1, 11):
        assert_same(runs["ema"][batch], runs["plain"][batch])
        assert_same(runs["ema+evals"][batch], runs["plain"][batch])


def test_eval_with_ema_false_only_tracks_the_average():
    ema = EMA(half_life="3ba", eval_with_ema=False)
    assert Event.EVAL_START not in ema.declare().events
    recorder = Recorder(smoothing=0.5 ** (1 / 3))
    trainer, _ = train([ema], 6, [recorder], eval_interval="3ba")
    for batch, seen in recorder.at_eval:
        assert_same(seen, recorder.training[batch])
    assert_same(weights(trainer.state.model), recorder.training[6])
    assert_same(dict(ema.ema), recorder.hand)


def test_ema_start_delays_the_average():
    ema = EMA(half_life="3ba", ema_start="5ba")
    recorder = Recorder(smoothing=0.5)
    seen = {}

    class Peek(Callback):
        def batch_end(self, state, logger):
            held = ema.ema
            seen[state.timestamp.batch] = held and {k: v.clone() for k, v in held.items()}

    train([ema], 8, [recorder, Peek()], eval_interval="4ba")
    assert seen[4] is None
    assert_same(recorder.at_eval[0][1], recorder.training[4])  # before the start: training
    assert_same(seen[5], recorder.training[5])  # starts as a copy
    assert ema.anchor == 5


# -- pruning and rewinding --------------------------------------------------------------------


class Watch(Callback):
    def __init__(self, ema):
        self.ema, self.average, self.training = ema, {}, {}

    def batch_end(self, state, logger):
        batch = state.timestamp.batch
        self.average[batch] = {n: t.clone() for n, t in self.ema.ema.items()}
        self.training[batch] = weights(state.model)


def test_the_average_is_exactly_zero_where_pruned():
    pruning = MagnitudePruning(sparsity=0.5, at="5ba")
    ema = EMA(half_life="4ba", update_interval="2ba")  # batch 5 is not an update step
    watch = Watch(ema)
    trainer, _ = train([pruning, ema], 12, [watch], net=model())
    assert pruning.masks
    for batch in range(5, 13):
        for name, mask in pruning.masks.items():
            assert torch.all(watch.average[batch][name][~mask] == 0), (batch, name)
    final = trainer.state.model.state_dict()
    for name, mask in pruning.masks.items():
        assert torch.all(final[name][~mask] == 0)
        # survivors are averaged, not copied
        assert not torch.equal(final[name][mask], watch.training[12][name][mask])
    assert watch.average[4]["net.0.weight"].eq(0).sum() == 0  # dense before pruning
    # the average is plain data: no autograd history, no storage shared with the model
    params = {n: p.data_ptr() for n, p in trainer.state.model.named_parameters()}
    for name, tensor in ema.ema.items():
        assert tensor.grad_fn is None and not tensor.requires_grad
        assert tensor.data_ptr() != params.get(name)


@pytest.mark.parametrize("mode", ["weights", "lr"])
def test_a_weight_rewind_restarts_the_average_from_the_rewound_weights(mode):
    pruning = MagnitudePruning(sparsity=0.5, at="5ba")
    rewinding = Rewinding(mode=mode, to="0ba")
    ema = EMA(half_life="4ba")
    watch = Watch(ema)
    initial = {}

    class Initial(Callback):
        def fit_start(self, state, logger):
            initial.update(weights(state.model))

    train([pruning, rewinding, ema], 8, [watch, Initial()], net=model())
    at_rewind, live = watch.average[5], watch.training[5]
    assert not torch.equal(watch.average[4]["net.0.weight"], watch.training[4]["net.0.weight"])
    if mode == "weights":
        assert_same(at_rewind, live)  # the average restarts at the rewound weights
        mask = pruning.masks["net.0.weight"]
        assert torch.equal(at_rewind["net.0.weight"][mask], initial["net.0.weight"][mask])
        # and averages on from there
        assert not torch.equal(watch.average[8]["net.0.weight"], watch.training[8]["net.0.weight"])
    else:  # LR rewinding keeps the weights, so the average keeps its history
        assert not torch.equal(at_rewind["net.0.weight"], live["net.0.weight"])
    for name, mask in pruning.masks.items():
        assert torch.all(at_rewind[name][~mask] == 0)


# -- resume -----------------------------------------------------------------------------------


def resume(saved, steps):
    ema = EMA(half_life="3ba", update_interval="2ba")
    ema.load_state_dict(through_torch_save(saved["ema"]))
    train_loader, eval_loader = loaders(make_blobs(n=64), batch_size=8)
    net = model(seed=7, batchnorm=True)
    net.load_state_dict(saved["model"])
    trainer = Trainer(
        net,
        train_loader,
        f"{steps}ba",
        eval_dataloader=eval_loader,
        algorithms=[ema],
        optimizer=SGD,
        eval_interval="0ba",
    )
    load_optimizer_and_time(trainer, saved)
    trainer.fit()
    return trainer, ema


@pytest.mark.parametrize("where", ["mid-run", "after fit"])
def test_resume_from_state_dict_is_exact(where):
    ema = EMA(half_life="3ba", update_interval="2ba")
    checkpoint = SaveAt(5, lambda state: snapshot(state, ema=ema))
    full, _ = train([ema], 12, [checkpoint])
    if where == "mid-run":
        saved = checkpoint.saved
        assert saved["ema"]["model_holds_ema"] is False
    else:  # a run stopped at 5 batches: the model holds the average, the EMA the training
        first = EMA(half_life="3ba", update_interval="2ba")
        short, _ = train([first], 5)
        saved = snapshot(short.state, ema=first)
        assert saved["ema"]["model_holds_ema"] is True
    assert all(t.device.type == "cpu" for t in saved["ema"]["weights"].values())
    resumed, resumed_ema = resume(saved, 12)
    assert_same(weights(resumed.state.model), weights(full.state.model))
    assert_same(dict(resumed_ema.ema), dict(ema.ema))


# -- arguments, config and composition --------------------------------------------------------


test_bad_arguments_raise_naming_the_argument = bad_arguments_test(
    EMA,
    [
        ({"half_life": "0ba"}, "ema.half_life must be > 0"),
        ({"half_life": "10sec"}, "ema.half_life"),
        ({"half_life": "ten"}, "ema.half_life"),
        ({"smoothing": 0.0}, r"ema.smoothing must be in \(0, 1\)"),
        ({"smoothing": 1.0}, r"ema.smoothing must be in \(0, 1\)"),
        ({"smoothing": -0.5}, "ema.smoothing"),
        ({"half_life": "100ba", "smoothing": 0.9}, "half_life or smoothing, not both"),
        ({"update_interval": "0ba"}, "ema.update_interval must be > 0"),
        ({"ema_start": "soon"}, "ema.ema_start"),
    ],
)


def test_bad_values_in_a_recipe_are_config_errors():
    with pytest.raises(ConfigError, match=r"algorithms.ema.*ema.half_life must be > 0"):
        load_config("quickstart", ["algorithms.ema.half_life=0ba"])
    with pytest.raises(ConfigError, match=r"algorithms.ema.*not both"):
        load_config("quickstart", ["algorithms.ema.half_life=10ba", "algorithms.ema.smoothing=0.9"])
    cfg = load_config("quickstart", ["algorithms.ema.half_life=100ba"])
    assert cfg.algorithms.ema.half_life == "100ba"


def test_token_half_life_without_tokens_fails_at_fit_start():
    with pytest.raises(ConfigError, match=r"algorithms.ema.half_life: 1000tok"):
        train([EMA(half_life="1000tok")], 1)


def test_plan_with_the_named_four_has_no_conflict_and_orders_ema_last():
    algorithms = [
        EMA(half_life="100ba", update_interval="20ba"),
        LabelSmoothing(alpha=0.1),
        ProgressiveResizing(),
        MagnitudePruning(sparsity=0.5, at="100ba"),
        Rewinding(mode="weights", to="10ba"),
    ]
    plan = plan_of(algorithms, "cnn", "image", known_names=set(ALGORITHMS.names()))
    assert plan.conflicts == []
    assert not [w for w in plan.warnings if w.startswith("ema ")]  # its order names exist
    assert plan.order[Event.BATCH_END] == ["magnitude_pruning", "rewinding", "ema"]
    assert plan.order[Event.FIT_START][-1] == "ema"
    assert plan.order[Event.EVAL_START] == ["ema"] and plan.order[Event.FIT_END] == ["ema"]
    access = algorithms[0].declare().events
    assert access[Event.BATCH_END].writes == frozenset()
    assert {"masks", "model.weights"} <= access[Event.BATCH_END].reads
    assert access[Event.FIT_END].writes == {"model.weights"}


def test_swa_is_declared_incompatible():
    swa = stand_in("swa", {Event.BATCH_END: Access(reads={"model.weights"})})
    algorithms = [EMA(), swa]
    plan = plan_of(algorithms)
    assert [c.kind for c in plan.conflicts] == ["incompatible"]
    assert "ema and swa" in str(plan.conflicts[0])


def test_smoke_run_of_a_recipe_with_ema(capsys, tmp_path):
    code = smoke_run(tmp_path, "algorithms.ema.half_life=2ba")
    assert code == 0, capsys.readouterr().err
    records = metrics_records(tmp_path)
    smoothing = [r["ema/smoothing"] for r in records if "ema/smoothing" in r]
    assert smoothing == [pytest.approx(0.5**0.5)]
