"""The docs are true: what README.md and docs/*.md show runs as written.

* Every fenced ``speedup ...`` command (also after ``&&`` and ``torchrun ... -m speedup``)
  parses with the real command-line parser, and its recipe, overrides and plan validate as
  ``speedup`` would check them before training. ``speedup run`` commands on the embedded data
  (MNIST-1D, Shapes-2D) also run, shrunk by ``--smoke`` (``test_run_commands_train``, slow);
  commands on ImageNet, CIFAR-10 or C4, ``--nproc`` commands and the many-run ``lottery`` and
  ``bench`` commands validate only.
* Every relative link resolves to a file inside the repository (and to a heading, for an
  ``#anchor``); no page points at a ``../`` path outside it.
* Every Python block compiles; each runs in a temporary working directory after the page's
  runnable commands, one namespace per page (``test_python_blocks_run``, slow), with recipes
  loaded as under ``--smoke``.

The rules the pages follow (README.md, "Conventions in these pages"):

* A placeholder is a word in capitals (``NAME``, ``RUN_DIR``) or anything in angle brackets
  (``runs/quickstart-<hash>``). A command with one is only parsed; a Python block with one only
  compiles and imports what it imports.
* A fenced YAML block whose first line is ``# <name>.yaml`` is that file: the commands of every
  page that name it use it.
* ``speedup report`` and ``speedup export`` read what an earlier command wrote: parsed only.
* Pages with tests of their own (``OWN_TESTS``) are skipped here but for their links; the
  Python blocks of ``PYTHON_TESTED_BELOW`` run in the tests at the end of this file.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from conftest import algorithm_trainer, loaders, make_blobs, tiny_model

from speedup.callback import Callback
from speedup.engine import build_plan
from speedup.event import Event

if TYPE_CHECKING:
    import argparse

    from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
#: Pages whose every block a test of their own runs (they are checked here for links only).
OWN_TESTS = {
    "your-own-data-and-model.md": "tests/test_own_workload_docs.py",
    "own-model.md": "tests/test_own_model.py",
}
#: Pages whose Python blocks the tests at the end of this file run (shortened, or checked).
PYTHON_TESTED_BELOW = {"quickstart.md", "writing-an-algorithm.md"}
#: Datasets made on the spot: ``speedup run`` commands on them also train (with --smoke).
EMBEDDED_DATA = {"mnist1d", "shapes2d"}

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
PLACEHOLDER = re.compile(r"<[^<>\s]+>|(?:^|[/=])[A-Z][A-Z0-9_]+(?:$|[/.])")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
OUTSIDE = re.compile(r"(?<![\w./])\.\./[\w./-]+")


def checked_pages() -> list[Path]:
    return [p for p in PAGES if p.name not in OWN_TESTS]


def fenced(page: Path) -> list[tuple[str, str, int]]:
    """``(language, body, line)`` of each fenced block of ``page``."""
    text = page.read_text(encoding="utf-8")
    return [
        (m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)
    ]


def prose(page: Path) -> str:
    """The page without its fenced blocks."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def commands(body: str) -> list[list[str]]:
    """The ``speedup`` argument lists of a shell block: one per ``speedup ...`` command, also
    after ``&&`` and as ``torchrun ... -m speedup[.run] ...``."""
    found = []
    for line in body.replace("\\\n", " ").splitlines():
        for segment in line.split("&&"):
            words = shlex.split(segment, comments=True)
            if words[:1] == ["speedup"]:
                found.append(words[1:])
            elif words[:1] == ["torchrun"] and "-m" in words:
                at = words.index("-m")
                module, rest = words[at + 1], words[at + 2 :]
                if module in ("speedup", "speedup.run"):
                    found.append(rest if module == "speedup" else ["run", *rest])
    return found


def shell_commands(page: Path) -> list[tuple[str, list[str]]]:
    where = []
    for language, body, line in fenced(page):
        if language in ("bash", "sh", "shell", "console"):
            where += [(f"{page.name}:{line}", argv) for argv in commands(body)]
    return where


def has_placeholder(argv: list[str]) -> bool:
    return any(PLACEHOLDER.search(word) for word in argv)


def defined_files() -> dict[str, str]:
    """``{name: text}`` of the files the pages define (a YAML block opening ``# name.yaml``)."""
    files = {}
    for page in checked_pages():
        for language, body, _ in fenced(page):
            first = body.splitlines()[0] if body.strip() else ""
            match = re.fullmatch(r"#\s*([\w.-]+\.ya?ml)\s*", first)
            if language in ("yaml", "yml") and match:
                files[match.group(1)] = body
    return files


@pytest.fixture
def docs_dir(tmp_path, monkeypatch):
    """A working directory holding the files the pages define, and a private cache."""
    for name, text in defined_files().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def parse(argv: list[str]):  # noqa: ANN201 - an argparse.Namespace
    """The arguments as ``speedup`` parses them (strays after flags are overrides, as in
    ``speedup.cli.main``); an unknown command or flag fails the test with argparse's message."""
    from speedup.cli import _parser

    parser = _parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args, extra = parser.parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"speedup {shlex.join(argv)}: {stderr.getvalue().strip()}")
    if extra:
        assert hasattr(args, "overrides"), f"unrecognized arguments: {extra}"
        assert all("=" in e or e.startswith("~") for e in extra), f"unrecognized: {extra}"
        args.overrides = [*args.overrides, *extra]
    assert args.command is not None, f"speedup {shlex.join(argv)}: no command"
    return args


def validate(argv: list[str], scratch: Path) -> str:
    """Check a command as far as it can be without training; returns what was checked."""
    from speedup.cli import main

    args = parse(argv)
    if has_placeholder(argv) or args.command in ("report", "export"):
        return "parsed"
    if args.command in ("list", "describe"):
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(argv) == 0, f"speedup {shlex.join(argv)} failed"
        return "ran"
    if args.command == "bench":
        return _validate_bench(args, scratch)
    from speedup.config import check_global_batch, load_config
    from speedup.run import plan_config

    cfg = load_config(args.recipe, args.overrides, smoke=args.smoke)
    plan, _ = plan_config(cfg)
    assert not plan.conflicts, f"speedup {shlex.join(argv)}: {plan.conflicts}"
    if args.command == "run" and args.nproc > 1:
        check_global_batch(cfg.data.batch_size, args.nproc)
    if args.command == "lottery":
        _validate_lottery(args, cfg)
    return "validated"


def _validate_lottery(args: argparse.Namespace, cfg: DictConfig) -> None:
    from dataclasses import fields

    from speedup.lottery.imp import IMPSettings

    from speedup.cli import _lottery_settings_errors

    _lottery_settings_errors(args)
    if args.scaling:
        from speedup.lottery.scaling import resolve_width_key

        resolve_width_key(cfg, args.width_key)
    elif not (args.pai or args.instability):
        # Each IMP setting is the flag of its name; an unset flag (None) leaves the setting's
        # default, as ``speedup lottery`` does. The settings check their values when built.
        flags = {f.name: getattr(args, f.name, None) for f in fields(IMPSettings)}
        IMPSettings(**{name: value for name, value in flags.items() if value is not None})


def _validate_bench(args: argparse.Namespace, scratch: Path) -> str:
    from speedup.benchmarks.harness import _config, load_suite, suite_names

    if args.list:
        assert suite_names()
        return "validated"
    suite = load_suite(args.suite, smoke=args.smoke)
    suite.overrides = [*suite.overrides, *args.overrides]
    # The baseline's config, and the one with every algorithm (each with its arguments) load.
    for algorithms in ([], list(suite.algorithms)):
        _config(suite, algorithms, suite.seeds[0], scratch)
    return "validated"


def runs_on_embedded_data(argv: list[str]) -> bool:
    """A single-process ``speedup run`` of a recipe whose data needs no download."""
    from speedup.config import load_config

    args = parse(argv)
    if args.command != "run" or args.nproc > 1 or has_placeholder(argv):
        return False
    return load_config(args.recipe, args.overrides).data.name in EMBEDDED_DATA


def test_every_command_in_the_docs_parses_and_validates(docs_dir):
    checked = {}
    for where, argv in (c for page in checked_pages() for c in shell_commands(page)):
        try:
            checked[f"{where}: speedup {shlex.join(argv)}"] = validate(argv, docs_dir)
        except Exception as err:  # name the command that failed, not just the error
            pytest.fail(f"{where}: speedup {shlex.join(argv)}: {type(err).__name__}: {err}")
    # The pages do show commands of every kind, and most are checked beyond parsing.
    assert {argv[0] for page in checked_pages() for _, argv in shell_commands(page)} >= {
        "run",
        "plan",
        "list",
        "describe",
        "lottery",
        "bench",
        "report",
        "export",
    }
    assert list(checked.values()).count("validated") > len(checked) / 2, checked


def test_placeholders_and_defined_files_follow_the_documented_rules():
    assert has_placeholder(["describe", "NAME"]) and has_placeholder(["report", "RUN_DIR"])
    assert has_placeholder(["export", "runs/quickstart-<hash>"])
    assert has_placeholder(["run", "r", "resume=runs/x-<hash>/checkpoints/ep3-ba312"])
    assert not has_placeholder(["run", "my_recipe.yaml", "optimizer.lr=0.005", "--smoke"])
    assert not has_placeholder(["run", "quickstart", "precision=bf16"])
    files = defined_files()
    assert "my_recipe.yaml" in files and files["my_recipe.yaml"].startswith("# my_recipe.yaml")
    named = {w for page in checked_pages() for _, argv in shell_commands(page) for w in argv}
    # Every recipe or suite file a command names is one a page defines.
    assert {w for w in named if w.endswith((".yaml", ".yml"))} <= set(files)


def test_readme_states_the_placeholder_rule():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "Conventions in these pages" in text and "<hash>" in text and "RUN_DIR" in text


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+\s+(.*)$", prose(page), flags=re.M)}


def test_every_relative_link_resolves_inside_the_repository():
    for page in PAGES:
        text = prose(page)
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            assert resolved.is_relative_to(ROOT), f"{where} leaves the repository"
            assert resolved.exists(), f"{where} does not exist"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved), f"{where}: no heading for #{anchor}"
        for mention in OUTSIDE.findall(text):
            resolved = (page.parent / mention).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), (
                f"{page.relative_to(ROOT)} points outside the repository: {mention}"
            )


def test_every_python_block_compiles():
    blocks = 0
    for page in checked_pages():
        for language, body, line in fenced(page):
            if language == "python":
                compile(body, f"{page.name}:{line}", "exec")
                blocks += 1
    assert blocks >= 5


def smoke_argv(argv: list[str]) -> list[str]:
    """The command shrunk by --smoke, on one thread (a loaded 2-core machine runs one torch
    thread several times faster than two), without a progress bar."""
    smoke = argv if "--smoke" in argv else [*argv, "--smoke"]
    return [*smoke, "threads=1", "progress_bar=false"]


@pytest.mark.slow
def test_run_commands_train(docs_dir):
    """Each ``speedup run`` on embedded data trains as written, shrunk by --smoke."""
    from speedup.cli import main

    threads = torch.get_num_threads()
    ran = 0
    try:
        for page in checked_pages():
            for where, argv in shell_commands(page):
                if not runs_on_embedded_data(argv):
                    continue
                with contextlib.redirect_stdout(io.StringIO()):
                    code = main(smoke_argv(argv))
                assert code == 0, f"{where}: speedup {shlex.join(smoke_argv(argv))} exited {code}"
                ran += 1
    finally:
        torch.set_num_threads(threads)  # threads=1 set it for this process
    assert ran >= 10


def _imports_only(body: str) -> str:
    return "\n".join(line for line in body.splitlines() if re.match(r"(from \S+ )?import \S", line))


# Runs a page's commands, then its Python blocks in one namespace, with recipes loaded as under
# --smoke. In a process of its own: MLflow, for one, caches a store by its URI, and the pages'
# "sqlite:///mlflow.db" is relative to each page's working directory.
PAGE_DRIVER = """
import json, sys
from speedup import config
from speedup.cli import main

plan = json.load(open(sys.argv[1]))
for argv in plan["commands"]:
    assert main(argv) == 0, argv
full = config.load_config
config.load_config = lambda recipe, overrides=None, smoke=True, **kw: full(
    recipe, overrides, smoke=True, **kw
)
namespace = {"__name__": "__docs__"}
for name, code in plan["blocks"]:
    exec(compile(code, name, "exec"), namespace)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "page",
    [p for p in checked_pages() if p.name not in PYTHON_TESTED_BELOW],
    ids=lambda p: p.name,
)
def test_python_blocks_run(page, docs_dir):
    """A page's Python blocks run in order, after its commands on embedded data, in one
    namespace; a block with a placeholder only imports what it imports."""
    import json
    import subprocess
    import sys

    blocks = [(f"{page.name}:{at}", body) for lang, body, at in fenced(page) if lang == "python"]
    if not blocks:
        pytest.skip(f"{page.name} has no Python block")
    runnable = [(name, body) for name, body in blocks if not PLACEHOLDER.search(body)]
    for name, body in blocks:
        if PLACEHOLDER.search(body):
            exec(compile(_imports_only(body), name, "exec"), {})
    if not runnable:
        return
    commands = [smoke_argv(a) for _, a in shell_commands(page) if runs_on_embedded_data(a)]
    plan = docs_dir / "page.json"
    plan.write_text(json.dumps({"commands": commands, "blocks": runnable}), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PAGE_DRIVER, str(plan)],
        cwd=docs_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_writing_an_algorithm_tutorial_code_trains():
    namespace: dict = {}
    exec(python_blocks("writing-an-algorithm.md")[0], namespace)
    algorithm = namespace["MySmoothing"](alpha=0.2)
    smoothed = namespace["smooth_labels"](torch.tensor([0, 2]), 4, 0.2)
    torch.testing.assert_close(smoothed[0], torch.tensor([0.85, 0.05, 0.05, 0.05]))

    class TargetTap(Callback):
        seen = None

        def after_loss(self, state, logger):
            self.seen = state.batch["targets"]

    tap = TargetTap()
    train, evaluation = loaders(make_blobs(n=64), batch_size=16)
    algorithm_trainer(
        tiny_model(),
        train,
        algorithm,
        steps=2,
        callbacks=[tap],
        optimizer=None,  # the Trainer's default
        eval_dataloader=evaluation,
        data_kind="signal",
    ).fit()
    assert tap.seen.dtype.is_floating_point and tap.seen.shape == (16, 4)
    assert torch.allclose(tap.seen.max(-1).values, torch.tensor(0.85))
    plan = build_plan({"my_smoothing": algorithm.declare()}, data_kind="text")
    assert [c.kind for c in plan.conflicts] == ["not-applicable"]
    assert Event.BEFORE_LOSS in algorithm.declare().events


@pytest.mark.slow
def test_quickstart_python_api_example():
    code = python_blocks("quickstart.md")[0].replace('"10ep"', '"2ep"')
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["trainer"].state.eval_metrics["accuracy"] > 0.3


def test_recipes_reference_is_generated_from_the_schema():
    from dataclasses import fields

    from speedup.config import REFERENCE, RunConfig, reference_table

    assert set(REFERENCE) == {f.name for f in fields(RunConfig)} | {"extends"}
    text = (DOCS / "recipes.md").read_text()
    assert reference_table() in text, "regenerate: python -m speedup.config"


def test_writing_an_algorithm_conformance_example_runs():
    namespace: dict = {}
    blocks = python_blocks("writing-an-algorithm.md")
    exec(blocks[0], namespace)
    exec(blocks[1], namespace)
    report = namespace["report"]
    assert report.algorithm == "my_smoothing" and report.steps == 8
    assert report.applied and all(count > 0 for count in report.applied.values())
