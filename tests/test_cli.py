"""The command line: bad input fails before training with exit 2 and one clear message."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from speedup.algorithm import ALGORITHMS, Access, Algorithm, Declaration
from speedup.cli import main
from speedup.event import Event


@ALGORITHMS.register("test_target_writer")
class TargetWriter(Algorithm):
    """Test algorithm: writes batch.targets at BEFORE_LOSS (a no-op rewrite)."""

    name = "test_target_writer"

    def __init__(self, strength: float = 0.1):
        self.strength = strength

    def declare(self):
        return Declaration(
            {Event.BEFORE_LOSS: Access(reads={"batch.targets"}, writes={"batch.targets"})}
        )

    def apply(self, event, state, logger):
        state.batch["targets"] = state.batch["targets"].clone()


@ALGORITHMS.register("test_other_target_writer")
class OtherTargetWriter(TargetWriter):
    """Test algorithm: also writes batch.targets, ordered after test_target_writer."""

    name = "test_other_target_writer"

    def declare(self):
        base = super().declare()
        return Declaration(base.events, runs_after={"test_target_writer"})


@ALGORITHMS.register("test_unordered_writer")
class UnorderedWriter(TargetWriter):
    """Test algorithm: writes batch.targets with no declared order."""

    name = "test_unordered_writer"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def assert_user_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def test_unknown_recipe(capsys):
    code, _, err = run_cli(capsys, "run", "quickstrat")
    assert_user_error(code, err, "unknown recipe 'quickstrat'", "did you mean 'quickstart'")


def test_unknown_key_in_file_with_did_you_mean(capsys, tmp_path):
    recipe = write(tmp_path / "r.yaml", "extends: quickstart\nmax_duraton: 3ep\n")
    code, _, err = run_cli(capsys, "run", str(recipe))
    assert_user_error(code, err, str(recipe), "'max_duraton'", "did you mean 'max_duration'")


def test_unknown_key_on_command_line(capsys):
    code, _, err = run_cli(capsys, "run", "quickstart", "optimizer.momentun=0.9")
    assert_user_error(code, err, "the command line", "optimizer.momentun", "lr")


def test_unknown_component_argument_names_its_file(capsys, tmp_path):
    recipe = write(tmp_path / "r.yaml", "extends: quickstart\nmodel:\n  chanels: 8\n")
    code, _, err = run_cli(capsys, "run", str(recipe))
    assert_user_error(code, err, str(recipe), "model.chanels", "did you mean 'channels'")


@pytest.mark.parametrize(
    "override, needles",
    [
        ("seed=abc", ["seed", "int"]),
        ("model.channels=wide", ["model.channels", "expected int"]),
        ("deterministic=maybe", ["deterministic"]),
        ("precision=fp8", ["precision", "fp32, bf16, fp16"]),
    ],
)
def test_wrong_type(capsys, override, needles):
    code, _, err = run_cli(capsys, "run", "quickstart", override)
    assert_user_error(code, err, "the command line", *needles)


def test_unknown_algorithm(capsys, tmp_path):
    recipe = write(tmp_path / "r.yaml", "extends: quickstart\nalgorithms:\n  lable_smoothing: {}\n")
    code, _, err = run_cli(capsys, "run", str(recipe))
    assert_user_error(code, err, str(recipe), "unknown algorithm 'lable_smoothing'", "available")


@pytest.mark.parametrize(
    "value, needle",
    [
        ("-3ep", "negative"),
        ("3epochs", "unknown time unit"),
        ("ten", "malformed"),
        ("0.5dur", "cannot be in dur"),
        ("0ba", "must be > 0"),
    ],
)
def test_bad_duration(capsys, value, needle):
    code, _, err = run_cli(capsys, "run", "quickstart", f"max_duration={value}")
    assert_user_error(code, err, "max_duration", needle)


def test_missing_data_path_fails_before_any_file_is_written(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "run", "quickstart", "data.path=/nonexistent/mnist1d_data.pkl", f"run_dir={run_dir}"
    )
    assert_user_error(code, err, "data.path", "/nonexistent/mnist1d_data.pkl", "put")
    assert not run_dir.exists()


def test_extends_cycle(capsys, tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\nseed: 2\n")
    code, _, err = run_cli(capsys, "run", str(tmp_path / "a.yaml"))
    assert_user_error(code, err, "cycle", "a.yaml -> b.yaml -> a.yaml")


def test_conflicting_algorithms_fail_before_training(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "run",
        "quickstart",
        f"run_dir={run_dir}",
        "algorithms.test_target_writer={}",
        "algorithms.test_unordered_writer={}",
    )
    assert code == 2 and "Traceback" not in err
    assert "test_target_writer and test_unordered_writer both write batch.targets" in err
    assert not run_dir.exists()


def test_debug_shows_the_traceback(capsys):
    code, _, err = run_cli(capsys, "--debug", "run", "quickstart", "seed=abc")
    assert code == 2 and "Traceback" in err


def test_plan_orders_and_reports(capsys):
    code, out, _ = run_cli(
        capsys,
        "plan",
        "quickstart",
        "algorithms.test_other_target_writer={}",
        "algorithms.test_target_writer={}",
    )
    assert code == 0
    block = out[out.index("BEFORE_LOSS:") :]
    assert block.index("test_target_writer") < block.index("test_other_target_writer")
    assert "no conflicts" in out
    code, out, _ = run_cli(
        capsys,
        "plan",
        "quickstart",
        "algorithms.test_target_writer={}",
        "algorithms.test_unordered_writer={}",
    )
    assert code == 1
    assert "CONFLICTS (1)" in out and "both write batch.targets at BEFORE_LOSS" in out


def test_list_and_describe(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for heading in ("algorithms:", "recipes:", "models:", "datasets:", "optimizers:"):
        assert heading in out
    assert "quickstart" in out and "mnist1d_cnn" in out and "adamw" in out
    code, out, _ = run_cli(capsys, "describe", "test_target_writer")
    assert code == 0
    assert "writes batch.targets" in out and "BEFORE_LOSS" in out and "strength" in out
    code, _, err = run_cli(capsys, "describe", "nonesuch")
    assert code == 2 and "unknown name 'nonesuch'" in err


def test_smoke_run_writes_the_run_directory(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(
        capsys,
        "run",
        "quickstart",
        "--smoke",
        f"run_dir={run_dir}",
        "progress_bar=false",
        "algorithms.test_target_writer={}",
    )
    assert code == 0
    assert f"run dir: {run_dir}" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["recipe"] == "quickstart" and summary["steps"] == 4
    assert summary["seed"] == 17 and summary["train_time_s"] > 0
    assert set(summary["metrics"]) == {"accuracy", "loss"}
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss/train" in r] == [1, 2, 3, 4]
    assert lines[-1]["eval/accuracy"] == summary["metrics"]["accuracy"]
    config = (run_dir / "config.yaml").read_text()
    assert "max_duration: 4ba" in config and "test_target_writer" in config


def test_console_script_and_module_entry_points():
    result = subprocess.run(
        [sys.executable, "-m", "speedup", "run", "nope"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "unknown recipe 'nope'" in result.stderr
    assert "Traceback" not in result.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "speedup", "--help"], capture_output=True, text=True
    )
    assert help_text.returncode == 0
    for command in ("run", "plan", "list", "describe"):
        assert command in help_text.stdout
