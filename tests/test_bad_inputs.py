"""Bad input fails before training: exit 2 and one line naming the key (issue 15).

Each case goes through the real command line (``speedup.cli.main``, or a subprocess where a
hang is the failure being guarded against) and asserts the exit code, that exactly one
``error:`` line is printed with no traceback, that it names the key, and that no run
directory was written. Time constants longer than the run are warnings, not errors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _helpers import error_line, run_cli, speedup_process, write
from conftest import loaders, make_blobs, tiny_model
from speedup.algorithms.ema import EMA
from speedup.algorithms.magnitude_pruning import MagnitudePruning
from speedup.algorithms.seq_length_warmup import SeqLengthWarmup
from speedup.algorithms.stochastic_depth import StochasticDepth
from speedup.algorithms.swa import SWA

from speedup.config import ConfigError, load_config
from speedup.engine import long_time_constants
from speedup.models import MODELS, Classifier
from speedup.time import Time, TimeConverter, TimeUnit
from speedup.trainer import Trainer


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line, which holds every needle."""
    line = error_line(code, err)
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


# -- values the command line used to accept ---------------------------------------------------


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["optimizer.lr=-1"], ["optimizer.lr", "-1", "Invalid learning rate"]),
        (["optimizer.lr=abc"], ["optimizer.lr", "wrong type", "'abc'"]),
        (["optimizer.betas=[0.9, 1.5]"], ["optimizer.betas", "beta"]),
        (
            ["optimizer.name=sgd", "optimizer.lr=0.1", "optimizer.momentum=-0.5"],
            ["optimizer.momentum", "-0.5"],
        ),
        (["scheduler.alpha_f=abc"], ["scheduler.alpha_f", "wrong type", "float"]),
        (["scheduler.name=step", "scheduler.step_size=0ba"], ["scheduler.step_size", "> 0"]),
        (["scheduler.name=step", "scheduler.gamma=-1"], ["scheduler.gamma", "> 0"]),
        (["scheduler.warmup=30sec"], ["scheduler.warmup", "wall-clock"]),
        (["model.channels=0"], ["model.channels", "positive", "got 0"]),
        (["model.channels=-4"], ["model.channels", "positive", "got -4"]),
        (["model.name=mlp", "model.widths=[300, 0]"], ["model.widths", "positive"]),
        (["device=banana"], ["device", "'banana'", "not a torch device"]),
        (["precision=fp16", "device=cpu"], ["precision", "fp16", "CUDA", "cpu"]),
        (["threads=-1"], ["threads", ">= 1", "-1"]),
        (["threads=0"], ["threads", ">= 1"]),
        (["data.num_workers=-1"], ["data.num_workers", ">= 0", "-1"]),
        (["data.train_samples=50"], ["data.batch_size", "256", "data.train_samples", "50"]),
    ],
)
def test_bad_value_exits_2_before_training(capsys, tmp_path, overrides, needles):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "run", "quickstart", *overrides, f"run_dir={run_dir}")
    assert_one_line_error(code, err, "the command line", *needles)
    assert not run_dir.exists()


def test_a_cuda_index_past_the_last_device_is_refused(capsys, tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last, on any machine
    code, _, err = run_cli(capsys, "run", "quickstart", f"device={missing}", f"run_dir={tmp_path}")
    assert_one_line_error(code, err, "device", repr(missing), "devices on this machine")


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks CUDA on this machine")
def test_fp16_with_auto_device_on_a_machine_without_cuda_is_refused(capsys):
    code, _, err = run_cli(capsys, "plan", "quickstart", "precision=fp16")
    assert_one_line_error(code, err, "precision", "fp16", "auto, which is cpu here")


def test_fp16_under_smoke(tmp_path, capsys):
    # A recipe written for GPUs smoke-tests on the CPU in bf16 ...
    recipe = write(tmp_path / "gpu.yaml", "extends: quickstart\nprecision: fp16\ndevice: cuda\n")
    assert load_config(str(recipe), smoke=True).precision == "bf16"
    # ... but fp16 asked for on the command line with the CPU is refused, --smoke or not.
    for smoke in ([], ["--smoke"]):
        code, _, err = run_cli(capsys, "plan", "quickstart", "precision=fp16", "device=cpu", *smoke)
        assert_one_line_error(code, err, "the command line: precision", "fp16")


def test_nproc_zero_exits_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "quickstart", "--nproc", "0", f"run_dir={tmp_path / 'r'}")
    assert_one_line_error(code, err, "--nproc", ">= 1", "got 0")
    assert not (tmp_path / "r").exists()


def test_valid_optimizer_and_scheduler_values_still_load():
    cfg = load_config(
        "quickstart",
        ["optimizer.betas=[0.9, 0.95]", "optimizer.lr=3e-4", "scheduler.alpha_f=0.1"],
    )
    assert list(cfg.optimizer.betas) == [0.9, 0.95] and cfg.scheduler.alpha_f == 0.1
    cfg = load_config("quickstart", ["scheduler.name=multistep", "scheduler.milestones=[10ep]"])
    assert list(cfg.scheduler.milestones) == ["10ep"]
    assert load_config("quickstart", ["threads=1", "data.num_workers=0"]).threads == 1


def sized_model(info, depth: int = 2, widths: tuple[int, ...] = (4,), offset: int = 0):
    """Test model: ``depth`` and ``widths`` are sizes; ``offset`` (default 0) is not."""
    return Classifier(torch.nn.Linear(1, 2), 2, kind="mlp")


@pytest.fixture
def sized_model_registered():
    """Registered for one test only: other tests compare the registry with the listing."""
    MODELS.register("test_sized_model", kind="mlp")(sized_model)
    yield
    MODELS._items.pop("test_sized_model", None)


@pytest.mark.usefixtures("sized_model_registered")
@pytest.mark.parametrize(
    "override, refused",
    [
        ("model.depth=0", True),
        ("model.widths=[4, -1]", True),
        ("model.depth=3", False),
        ("model.offset=-1", False),  # a default of 0 marks an argument that is not a size
    ],
)
def test_size_arguments_of_any_model_must_be_positive(override, refused):
    overrides = ["model.name=test_sized_model", override]
    if refused:
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=rf"{key}: must be a positive int"):
            load_config("quickstart", overrides)
    else:
        load_config("quickstart", overrides)


# -- recipe files ----------------------------------------------------------------------------


def test_a_list_where_a_mapping_belongs(capsys, tmp_path):
    recipe = write(tmp_path / "r.yaml", "extends: quickstart\noptimizer: [1, 2]\n")
    code, _, err = run_cli(capsys, "plan", str(recipe))
    assert_one_line_error(code, err, str(recipe), "optimizer", "expected a mapping", "[1, 2]")


@pytest.mark.parametrize(
    "section, needles",
    [
        ("  max_durration: 4ba\n", ["max_durration", "did you mean 'max_duration'"]),
        ("  model:\n    chanels: 4\n", ["model.chanels", "did you mean 'channels'"]),
        ("  optimizer:\n    lr: -1\n", ["optimizer.lr", "Invalid learning rate"]),
    ],
)
def test_smoke_section_is_checked_without_smoke(capsys, tmp_path, section, needles):
    recipe = write(tmp_path / "r.yaml", f"extends: quickstart\nsmoke:\n{section}")
    code, _, err = run_cli(capsys, "plan", str(recipe))
    assert_one_line_error(code, err, "smoke: section", *needles)


def test_command_line_errors_of_the_smoke_variant_do_not_block_the_real_run(tmp_path):
    # The smoke variant (CPU) cannot run fp16, but this run is not that variant.
    recipe = write(tmp_path / "r.yaml", "extends: quickstart\nsmoke:\n  seed: 3\n")
    if torch.cuda.is_available():
        assert load_config(str(recipe), ["precision=fp16", "device=cuda"]).precision == "fp16"
    assert load_config(str(recipe)).seed == 17


def _bomb(levels: int = 9, fanout: int = 10) -> str:
    """A "billion laughs" document: ``fanout ** levels`` values from a few hundred bytes."""
    lines = ["extends: quickstart", "smoke:", "  lol:"]
    lines.append("    l0: &l0 [" + ", ".join(['"lol"'] * fanout) + "]")
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fanout) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused(tmp_path):
    # 10**9 values once expanded: without the bound, loading runs far past the timeout.
    recipe = write(tmp_path / "bomb.yaml", _bomb())
    assert recipe.stat().st_size < 1000
    done = speedup_process("plan", str(recipe), timeout=120, cwd=tmp_path)
    assert_one_line_error(done.returncode, done.stderr, str(recipe), "100,000 values", "alias")


def test_recursive_alias_and_deep_nesting_are_refused(tmp_path):
    recursive = write(tmp_path / "loop.yaml", "extends: quickstart\nsmoke: &s\n  again: *s\n")
    with pytest.raises(ConfigError, match="contains it; a recipe must be a tree"):
        load_config(str(recursive))
    deep = write(tmp_path / "deep.yaml", "smoke:\n  x: " + "[" * 100 + "]" * 100 + "\n")
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        load_config(str(deep))


def test_anchors_within_bounds_still_work(tmp_path):
    text = "extends: quickstart\noptimizer: &opt\n  name: sgd\n  lr: 0.05\n"
    text += "smoke:\n  optimizer: *opt\n"
    recipe = write(tmp_path / "r.yaml", text)
    assert load_config(str(recipe), smoke=True).optimizer.lr == 0.05


def test_yaml_syntax_error_is_one_line(capsys, tmp_path):
    recipe = write(tmp_path / "r.yaml", "extends: quickstart\nseed: [1,\n")
    code, _, err = run_cli(capsys, "plan", str(recipe))
    assert_one_line_error(code, err, str(recipe), "not valid YAML at line 3")


# -- a batch larger than the training set ----------------------------------------------------


@pytest.mark.parametrize("duration", ["3ba", "2ep"])
def test_batch_larger_than_the_training_set_exits_2_naming_both(capsys, tmp_path, duration):
    # Before: in batches, endless empty epochs each writing a checkpoint; in epochs, a
    # ZeroDivisionError. The dataset's size is known only once it is built.
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "run",
        "quickstart",
        "data.num_train=100",
        "data.batch_size=128",
        f"max_duration={duration}",
        "progress_bar=false",
        f"run_dir={run_dir}",
    )
    assert_one_line_error(code, err, "data.batch_size", "128", "100 samples")
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


# -- time constants longer than the run ------------------------------------------------------


def test_long_time_constants_compares_in_a_common_unit():
    constants = {
        "half_life": Time(1000, TimeUnit.BATCH),
        "short": Time(100, TimeUnit.BATCH),
        "whole": Time(1, TimeUnit.DURATION),
        "twice": Time(2, TimeUnit.DURATION),
        "epochs": Time(3, TimeUnit.EPOCH),
        "samples": Time(5000, TimeUnit.SAMPLE),
        "few_samples": Time(3000, TimeUnit.SAMPLE),
    }
    run = Time(125, TimeUnit.BATCH)
    # Before the data is built, with a batch of 32: 5000sp = 156.25ba, 3000sp = 93.75ba; the
    # epoch's length is unknown, so "epochs" is left for the run.
    planned = long_time_constants(constants, run, batch_size=32)
    assert [m.split(":")[0] for m in planned] == ["half_life", "twice", "samples"]
    # With the data built, 50 batches an epoch: 3ep = 150ba.
    converter = TimeConverter(batches_per_epoch=50, samples_per_batch=32, max_duration=run)
    exact = long_time_constants(constants, run, converter)
    assert [m.split(":")[0] for m in exact] == ["half_life", "twice", "epochs", "samples"]
    assert "(150ba against 125ba)" in exact[2]


def test_algorithms_declare_their_time_constants():
    assert EMA().time_constants() == {
        "half_life": Time(1000, TimeUnit.BATCH),
        "ema_start": Time(0.0, TimeUnit.DURATION),
    }
    assert "half_life" not in EMA(smoothing=0.99).time_constants()
    assert SWA(swa_start="30ep").time_constants() == {"swa_start": Time(30, TimeUnit.EPOCH)}
    assert SeqLengthWarmup(duration="500ba").time_constants() == {
        "duration": Time(500, TimeUnit.BATCH)
    }
    assert StochasticDepth(drop_warmup="0.2dur").time_constants() == {
        "drop_warmup": Time(0.2, TimeUnit.DURATION)
    }
    assert StochasticDepth().time_constants() == {}  # no warmup, nothing to compare
    assert MagnitudePruning(schedule="oneshot", at="200ba").time_constants() == {
        "at": Time(200, TimeUnit.BATCH)
    }
    assert MagnitudePruning(schedule="gradual", start="1ep", end="4ep").time_constants() == {
        "start": Time(1, TimeUnit.EPOCH),
        "end": Time(4, TimeUnit.EPOCH),
    }


def test_plan_warns_about_time_constants_longer_than_the_run(capsys):
    algorithms = "algorithms={ema: {}}"
    code, out, _ = run_cli(
        capsys, "plan", "quickstart", algorithms, "max_duration=125ba", "scheduler.warmup=200ba"
    )
    assert code == 0
    warned = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warned == [
        "warning: algorithms.ema.half_life: 1000ba is longer than the whole run (max_duration "
        "125ba), so it never plays out as set; shorten it or train longer",
        "warning: scheduler.warmup: 200ba is longer than the whole run (max_duration 125ba), so "
        "it never plays out as set; shorten it or train longer",
    ]
    code, out, _ = run_cli(capsys, "plan", "quickstart", algorithms, "max_duration=2000ba")
    assert code == 0 and "longer than the whole run" not in out


def _timing_warnings(max_duration: str) -> list[str]:
    """The warnings about time constants longer than the run that building a Trainer gives:
    EMA's default half-life and a 3-epoch warmup, over 10 batches an epoch."""
    train, _ = loaders(make_blobs(n=160), batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(
            tiny_model(),
            train,
            max_duration,
            algorithms=[EMA()],
            scheduler={"name": "cosine", "warmup": "3ep"},
        )
    return [str(w.message) for w in caught if "longer than the whole run" in str(w.message)]


def test_trainer_warns_exactly_once_the_epoch_length_is_known():
    assert _timing_warnings("2ep") == [
        "algorithms.ema.half_life: 1000ba is longer than the whole run (max_duration 2ep) "
        "(1000ba against 20ba), so it never plays out as set; shorten it or train longer",
        "scheduler.warmup: 3ep is longer than the whole run (max_duration 2ep), so it never "
        "plays out as set; shorten it or train longer",
    ]
    assert _timing_warnings("200ep") == []
