"""The command line: bad input fails before training with exit 2 and one clear message."""

import json
from pathlib import Path

import pytest
from _helpers import error_line, run_cli, speedup_process, write

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


def assert_user_error(code, err, *needles):
    error_line(code, err)
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def smoke_run(run_dir: Path, *overrides: str) -> list[str]:
    """The arguments of a smoke run of the quickstart into ``run_dir``, without a progress bar."""
    return ["run", "quickstart", "--smoke", f"run_dir={run_dir}", "progress_bar=false", *overrides]


def test_unknown_recipe(capsys):
    code, _, err = run_cli(capsys, "run", "quickstrat")
    assert_user_error(code, err, "unknown recipe 'quickstrat'", "did you mean 'quickstart'")


@pytest.mark.parametrize(
    "text, needles",
    [
        pytest.param(
            "extends: quickstart\nmax_duraton: 3ep\n",
            ["'max_duraton'", "did you mean 'max_duration'"],
            id="unknown_key_with_did_you_mean",
        ),
        pytest.param(
            "extends: quickstart\nmodel:\n  chanels: 8\n",
            ["model.chanels", "did you mean 'channels'"],
            id="unknown_component_argument",
        ),
        pytest.param(
            "extends: quickstart\nalgorithms:\n  lable_smoothing: {}\n",
            ["unknown algorithm 'lable_smoothing'", "available"],
            id="unknown_algorithm",
        ),
    ],
)
def test_a_mistake_in_a_recipe_file_names_the_file(capsys, tmp_path, text, needles):
    recipe = write(tmp_path / "r.yaml", text)
    code, _, err = run_cli(capsys, "run", str(recipe))
    assert_user_error(code, err, str(recipe), *needles)


def test_unknown_key_on_command_line(capsys):
    code, _, err = run_cli(capsys, "run", "quickstart", "optimizer.momentun=0.9")
    assert_user_error(code, err, "the command line", "optimizer.momentun", "lr")


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
    code, out, err = run_cli(
        capsys,
        "plan",
        "quickstart",
        "algorithms.test_target_writer={}",
        "algorithms.test_unordered_writer={}",
    )
    # A conflict is bad input, as for `speedup run`: exit 2 and one error line, after the plan.
    assert "CONFLICTS (1)" in out and "both write batch.targets at BEFORE_LOSS" in out
    assert_user_error(code, err, "1 composition conflict (listed above)", "speedup run")


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
    code, out, _ = run_cli(capsys, *smoke_run(run_dir, "algorithms.test_target_writer={}"))
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
    result = speedup_process("run", "nope")
    assert result.returncode == 2 and "unknown recipe 'nope'" in result.stderr
    assert "Traceback" not in result.stderr
    help_text = speedup_process("--help")
    assert help_text.returncode == 0
    for command in ("run", "plan", "list", "describe"):
        assert command in help_text.stdout


def test_plan_and_run_exit_alike_on_a_conflict(capsys, tmp_path):
    conflict = ["algorithms.test_target_writer={}", "algorithms.test_unordered_writer={}"]
    plan_code, _, _ = run_cli(capsys, "plan", "quickstart", *conflict)
    run_code, _, _ = run_cli(capsys, "run", "quickstart", f"run_dir={tmp_path / 'r'}", *conflict)
    assert plan_code == run_code == 2


def test_max_duration_errors_list_only_the_units_it_accepts(capsys):
    for value in ("ten", "3epochs", "0.5dur"):
        code, _, err = run_cli(capsys, "run", "quickstart", f"max_duration={value}")
        assert_user_error(code, err, "max_duration", "units: ep, ba, sp, tok, sec")
        assert "dur," not in err.split("units:")[1] and "'0.25dur'" not in err
    code, _, err = run_cli(capsys, "run", "quickstart", "eval_interval=ten")  # dur is fine there
    assert_user_error(code, err, "eval_interval", "units: ep, ba, sp, tok, dur, sec")


def test_summaries_are_whole_first_sentences_in_plain_text():
    from speedup.listing import plain_text, summary

    doc = """ResNet-50 (He et al. 2016, v1.5), 25,557,032 parameters at 1000
        classes. ``pretrained`` loads weights.

        More text."""
    whole = "ResNet-50 (He et al. 2016, v1.5), 25,557,032 parameters at 1000 classes."
    assert summary(doc) == whole
    roles = "Uses :func:`~speedup.functional.smooth_labels`, e.g. for ``K`` classes. Then."
    assert summary(roles) == "Uses smooth_labels(), e.g. for K classes."
    assert summary("No full stop\n   over two lines") == "No full stop over two lines"
    marked = "Bold **what**, *emphasis*, `a link <https://x.org>`_ end here! Next."
    assert summary(marked) == "Bold what, emphasis, a link end here!"
    assert summary("") == "" and summary(None) == ""
    card = "Example::\n\n    x = 1\n\n.. note::\n   hidden\n\nShown ``*.JPEG`` :class:`F <a.F>`."
    assert plain_text(card) == "Example:\n\n    x = 1\n\nShown *.JPEG F."


def test_list_prints_whole_sentences_without_markup(capsys):
    code, out, _ = run_cli(capsys, "list", "algorithms", "models", "datasets", "recipes")
    assert code == 0
    assert "25,557,032 parameters at 1000 classes." in out  # was cut at "at 1000"
    for marker in ("``", ":func:", ":class:", "**"):
        assert marker not in out, marker
    rows = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert len(rows) > 50
    for row in rows:  # every summary ends its sentence
        _, _, text = row.partition("  ")
        assert text.strip().endswith((".", "!", "?", ")")), row


def test_list_wraps_long_summaries_on_a_terminal_only():
    from speedup.cli import _list_row

    text = ("word " * 40 + "end.").strip()
    piped = _list_row("name", text, None)
    assert "\n" not in piped and piped.endswith("end.")
    wrapped = _list_row("name", text, 60).splitlines()
    assert len(wrapped) > 1 and all(len(line) <= 60 for line in wrapped)
    assert all(line.startswith(" " * 8) for line in wrapped[1:])  # under the summary column
    assert " ".join(" ".join(wrapped).split()) == f"name {text}"  # the same words, in order


def test_describe_prints_plain_text(capsys):
    code, out, _ = run_cli(capsys, "describe", "label_smoothing")
    assert code == 0
    for marker in ("``", ":func:", ":class:", "**"):
        assert marker not in out, marker
    assert "Functional twin: smooth_labels()." in out
    assert "q' = (1 - alpha) * q + alpha / K" in out  # the formula, without its backticks


# -- a finished run, run again; its export -------------------------------------------------------


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``directory``: its modification time and its bytes."""
    return {
        str(path.relative_to(directory)): (path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    code = main(smoke_run(run_dir))
    assert code == 0
    return run_dir


def test_rerunning_a_finished_run_changes_nothing(capsys, finished_run):
    capsys.readouterr()
    before = snapshot(finished_run)
    assert "summary.json" in before and "metrics.jsonl" in before
    code, out, err = run_cli(capsys, *smoke_run(finished_run))
    assert code == 0
    assert "already complete" in err and "resuming" not in err
    assert f"run dir: {finished_run}" in out  # the finished run's table, again
    assert snapshot(finished_run) == before  # no file written, touched, added or removed
    assert json.loads((finished_run / "summary.json").read_text())["resumed_from"] is None


def copy_run(source: Path, destination: Path) -> Path:
    import shutil

    shutil.copytree(source, destination, symlinks=True)  # `latest` stays a link
    return destination


def train_again(capsys, run_dir: Path, override: str) -> dict:
    """Run the smoke run in the finished ``run_dir`` again with ``override``, which must make
    it train (not stop as already complete); returns the new summary."""
    code, _, err = run_cli(capsys, *smoke_run(run_dir, override))
    assert code == 0 and "already complete" not in err
    return json.loads((run_dir / "summary.json").read_text())


def test_a_longer_run_in_the_same_directory_continues(capsys, finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    summary = train_again(capsys, run_dir, "max_duration=6ba")
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("ba4")


def test_resume_never_trains_a_finished_run_again(capsys, finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run_dir)["summary.json"]
    summary = train_again(capsys, run_dir, "resume=never")
    assert summary["steps"] == 4 and summary["resumed_from"] is None
    assert snapshot(run_dir)["summary.json"] != before  # trained and written again


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_files_follow_the_umask(capsys, finished_run, tmp_path, umask):
    import os

    previous = os.umask(umask)
    try:
        code, out, _ = run_cli(capsys, "export", str(finished_run), "--out", str(tmp_path / "x"))
    finally:
        os.umask(previous)
    assert code == 0
    expected = 0o666 & ~umask  # what open() gives a new file under this umask
    weights = tmp_path / "x" / "model.safetensors"
    assert f"wrote {weights}" in out
    assert weights.stat().st_mode & 0o777 == expected
    assert (tmp_path / "x" / "speedup_config.json").stat().st_mode & 0o777 == expected


def test_run_recipe_names_the_smoke_keyword():
    from speedup.config import ConfigError
    from speedup.run import run_recipe

    with pytest.raises(ConfigError, match="'--smoke' is a command-line flag.*smoke=True"):
        run_recipe("quickstart", ["--smoke"])
