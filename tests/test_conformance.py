"""Every built-in algorithm passes the conformance kit, and the kit catches what it should."""

from __future__ import annotations

import pytest
import torch
from conftest import groupnorm_net

from speedup import Access, Algorithm, Declaration, Event
from speedup.algorithm import ALGORITHMS
from speedup.data import TensorBatchLoader
from speedup.engine import ConformanceError, Engine, checking_declarations
from speedup.models import Classifier
from speedup.testing import WORKLOADS, Workload, check_algorithm, default_workload
from speedup.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _groupnorm_cnn() -> Classifier:
    return Classifier(groupnorm_net(2), 4, kind="cnn")


GROUPNORM_CNN = Workload("cnn-groupnorm", "cnn", "image", _groupnorm_cnn, WORKLOADS["cnn"].data)

#: Arguments that make each algorithm act on the tiny workloads within a short run (defaults
#: tuned for ResNet-50 would often leave it idle: no layer wide enough, a start after the end).
CASES: dict[str, dict] = {
    "alibi": {"steps": 8},
    "augmix": {},
    "blurpool": {"kwargs": {"min_channels": 4}},
    "channels_last": {},
    "colout": {},
    "cutmix": {},
    "cutout": {},
    "ema": {"kwargs": {"half_life": "2ba"}, "workload": "cnn"},
    "factorize": {"kwargs": {"min_features": 16, "latent_features": 8}},
    "gated_linear_units": {"steps": 8},
    "ghost_batchnorm": {"kwargs": {"ghost_batch_size": 4}},
    "gradient_clipping": {"kwargs": {"clipping_threshold": 0.5}, "workload": "cnn"},
    "gyro_dropout": {"kwargs": {"sigma": 16, "tau": 4}},
    "label_smoothing": {},
    "layer_freezing": {"kwargs": {"freeze_start": "0.2dur"}, "workload": "cnn"},
    "low_precision_groupnorm": {"workload": GROUPNORM_CNN, "precision": "bf16"},
    "low_precision_layernorm": {"workload": "gpt2", "precision": "bf16", "steps": 6},
    "magnitude_pruning": {
        "kwargs": {"schedule": "gradual", "start": "0.2dur", "end": "0.6dur", "every": "2ba"},
        "workload": "cnn",
    },
    "mixup": {},
    "no_op_model": {},
    "progressive_resizing": {"kwargs": {"delay": "0.0dur", "finetune": "0.2dur"}},
    "randaugment": {},
    "rewinding": {
        "kwargs": {"mode": "weights", "to": "2ba"},
        "companions": [("magnitude_pruning", {"at": "0.5dur"})],
    },
    "sam": {"workload": "cnn"},
    "selective_backprop": {
        "kwargs": {"start": "0.0dur", "end": "0.8dur", "interval": 1},
        "workload": "cnn",
    },
    "seq_length_warmup": {"steps": 8},
    "squeeze_excite": {"kwargs": {"min_channels": 8, "latent_channels": 4}},
    "stochastic_depth": {"kwargs": {"drop_rate": 0.5}},
    "swa": {
        "kwargs": {
            "swa_start": "0.5dur",
            "update_interval": "2ba",
            "swa_lr": 0.01,
            "anneal_steps": "2ba",
            "bn_batches": 2,
        },
        "workload": "cnn",
    },
    "weight_standardization": {},
    "muon": {"workload": "cnn", "steps": 8},
    "lookahead": {"kwargs": {"k": 3}, "steps": 8},
    "schedule_free": {"scheduler": {"name": "constant"}, "steps": 8},
    "alternating_flip": {},
    "test_time_augmentation": {"kwargs": {"uncertain_fraction": 0.25}},
    # A first conv with a bias, so the bias phase ends mid-run and the resume crosses it.
    "whitening_init": {"kwargs": {"bias_phase": "5ba"}, "workload": GROUPNORM_CNN},
    # Warmup in trained samples (this algorithm's own counter), resumed mid-warmup.
    "batch_size_warmup": {"kwargs": {"duration": "100sp", "stages": 3}},
    "qk_norm": {"kwargs": {"norm": "layernorm", "scale": 0.12}, "steps": 8},
    "relu_squared": {"steps": 8},
    "rotary": {"steps": 8},
}

#: Throwaway algorithms of other test modules are named test_*; test_time_augmentation is a
#: built-in whose name happens to start so.
BUILT_IN = sorted(
    n for n in ALGORITHMS.names() if not n.startswith("test_") or n == "test_time_augmentation"
)


def test_every_built_in_algorithm_has_a_conformance_case():
    assert sorted(CASES) == BUILT_IN


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_algorithm_conforms(name):
    case = CASES[name]
    report = check_algorithm(name, **case)
    assert report.algorithm == name
    assert len(report.losses) == report.steps == case.get("steps", 20)
    assert sum(report.applied.values()) > 0
    assert len(report.checks) == 4


def test_rewinding_and_lr_rewinding_conform_with_their_pruner():
    report = check_algorithm(
        "rewinding",
        kwargs={"mode": "lr"},
        companions=[("magnitude_pruning", {"at": "0.4dur"})],
    )
    assert report.companions == ["magnitude_pruning"]
    assert "batch_end" in report.applied


def test_the_default_workload_follows_the_declaration():
    def names(algorithm):
        return default_workload(ALGORITHMS.get(algorithm)().declare()).name

    assert names("label_smoothing") == "mlp"  # signal data
    assert names("cutout") == "cnn"  # image data
    assert names("alibi") == "gpt2"
    assert names("gated_linear_units") == "bert"
    assert names("ema") == "mlp"  # anywhere: the cheapest


# -- planted violations -----------------------------------------------------------------------


class ScalesInputsSecretly(Algorithm):
    """Declares that it only reads the inputs, then scales them in place."""

    name = "scales_inputs_secretly"

    def declare(self) -> Declaration:
        return Declaration({Event.AFTER_DATALOADER: Access(reads={"batch.inputs"})})

    def apply(self, event, state, logger) -> None:
        state.batch["inputs"].mul_(1.5)


class DecaysLrSecretly(Algorithm):
    """Declares a read of the timestamp at BATCH_END, then lowers the learning rate."""

    name = "decays_lr_secretly"

    def declare(self) -> Declaration:
        return Declaration({Event.BATCH_END: Access(reads={"timestamp"})})

    def apply(self, event, state, logger) -> None:
        for group in state.optimizer.param_groups:
            group["lr"] *= 0.9


class ForwardsInTrainMode(Algorithm):
    """Declares gradient writes only, but runs a train-mode forward: BatchNorm statistics
    (buffers, hence ``model.weights``) move."""

    name = "forwards_in_train_mode"

    def declare(self) -> Declaration:
        return Declaration(
            {Event.AFTER_TRAIN_BATCH: Access(reads={"batch"}, writes={"model.grads"})}
        )

    def apply(self, event, state, logger) -> None:
        with torch.no_grad():
            state.model(state.batch)


class AddsBatchKey(Algorithm):
    """Writes batch.inputs as declared, and also adds an undeclared key."""

    name = "adds_batch_key"

    def declare(self) -> Declaration:
        return Declaration(
            {Event.AFTER_DATALOADER: Access(reads={"batch.inputs"}, writes={"batch.inputs"})}
        )

    def apply(self, event, state, logger) -> None:
        state.batch["inputs"] = state.batch["inputs"] * 1.0
        state.batch["weights"] = torch.ones(state.batch_size())


@pytest.mark.parametrize(
    ("algorithm", "workload", "event", "field"),
    [
        (ScalesInputsSecretly, "mlp", Event.AFTER_DATALOADER, "batch.inputs"),
        (DecaysLrSecretly, "mlp", Event.BATCH_END, "lr"),
        (ForwardsInTrainMode, "cnn", Event.AFTER_TRAIN_BATCH, "model.weights"),
        (AddsBatchKey, "mlp", Event.AFTER_DATALOADER, "batch.weights"),
    ],
)
def test_an_undeclared_write_is_caught_naming_the_algorithm_event_and_field(
    algorithm, workload, event, field
):
    with pytest.raises(ConformanceError) as caught:
        check_algorithm(algorithm, workload=workload)
    error = caught.value
    assert isinstance(error, AssertionError)
    assert (error.algorithm, error.event, error.fields) == (algorithm.name, event, [field])
    message = str(error)
    assert algorithm.name in message and event.name in message and field in message


def _mlp_trainer(algorithm, **kwargs) -> Trainer:
    train, _ = WORKLOADS["mlp"].data(0)
    return Trainer(
        WORKLOADS["mlp"].model(),
        TensorBatchLoader(train, 8),
        "3ba",
        algorithms=[algorithm],
        device="cpu",
        data_kind="signal",
        **kwargs,
    )


def test_check_mode_is_off_by_default_and_costs_nothing_there():
    trainer = _mlp_trainer(DecaysLrSecretly())
    assert trainer.engine.check_declarations is False
    # Off, the dispatch table holds the algorithm's own bound method, not a wrapper.
    ((_, _, apply),) = trainer.engine._dispatch[Event.BATCH_END]
    assert apply == trainer.state.algorithms[0].apply
    trainer.fit()  # the undeclared write goes unnoticed in production
    assert trainer.state.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**3)


def test_check_mode_is_switched_on_by_argument_context_or_environment(monkeypatch):
    with checking_declarations():
        trainer = _mlp_trainer(DecaysLrSecretly())
    with pytest.raises(ConformanceError, match="decays_lr_secretly changed lr at BATCH_END"):
        trainer.fit()
    assert trainer.state.timestamp.batch == 1  # stopped at the first offence
    engine = Engine(trainer.state, trainer.logger, check_declarations=True)
    assert engine.check_declarations
    monkeypatch.setenv("SPEEDUP_CHECK_DECLARATIONS", "1")
    assert Engine(trainer.state, trainer.logger).check_declarations
    monkeypatch.setenv("SPEEDUP_CHECK_DECLARATIONS", "0")
    assert not Engine(trainer.state, trainer.logger).check_declarations


# -- the other checks bite too ----------------------------------------------------------------


class Counts(Algorithm):
    """Scales gradients by a factor that grows with each call: real per-run state."""

    name = "counts"

    def __init__(self, save_count: bool = True, plain: bool = True) -> None:
        self.calls = 0
        self.save_count, self.plain = save_count, plain

    def declare(self) -> Declaration:
        return Declaration(
            {Event.AFTER_TRAIN_BATCH: Access(reads={"model.grads"}, writes={"model.grads"})}
        )

    def apply(self, event, state, logger) -> None:
        self.calls += 1
        for p in state.model.parameters():
            p.grad.mul_(1.0 + 0.05 * self.calls)

    def state_dict(self) -> dict:
        if not self.plain:
            return {"calls": self.calls, "when": object()}
        return {"calls": self.calls} if self.save_count else {}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state.get("calls", 0)


def test_a_state_dict_that_forgets_state_fails_the_resume_check():
    assert check_algorithm(Counts).state_dict_keys == ["calls"]
    with pytest.raises(ConformanceError, match=r"counts: a run resumed at step 10 .* differs"):
        check_algorithm(Counts, kwargs={"save_count": False})


def test_a_state_dict_with_objects_fails_the_plain_data_check():
    plain_data = (
        r"counts: checkpointing failed: .*counts#0\.when: a builtins\.object is not a tensor"
    )
    with pytest.raises(ConformanceError, match=plain_data):
        check_algorithm(Counts, kwargs={"plain": False})


class UnseededNoise(Algorithm):
    """Adds gradient noise from a generator seeded by the clock."""

    name = "unseeded_noise"

    def declare(self) -> Declaration:
        return Declaration({Event.AFTER_TRAIN_BATCH: Access(writes={"model.grads"})})

    def apply(self, event, state, logger) -> None:
        generator = torch.Generator().manual_seed(torch.seed())
        for p in state.model.parameters():
            p.grad.add_(torch.randn(p.shape, generator=generator) * 0.01)

    def state_dict(self) -> dict:
        return {}


def test_nondeterminism_is_caught():
    with pytest.raises(ConformanceError, match=r"unseeded_noise: (two runs with seed 0|a run)"):
        check_algorithm(UnseededNoise)


class NeverActs(Algorithm):
    name = "never_acts"

    def declare(self) -> Declaration:
        return Declaration({Event.BATCH_END: Access(reads={"timestamp"})})

    def match(self, event, state) -> bool:
        return False

    def apply(self, event, state, logger) -> None:
        raise AssertionError("unreachable")


def test_an_algorithm_that_never_acts_is_reported():
    with pytest.raises(ConformanceError, match=r"never_acts never acted in 20 steps on mlp"):
        check_algorithm(NeverActs)


def test_an_algorithm_that_does_not_apply_to_the_workload_is_reported():
    with pytest.raises(ConformanceError, match=r"cutout does not plan on workload mlp"):
        check_algorithm("cutout", workload="mlp")
