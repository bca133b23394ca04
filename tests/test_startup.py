"""Fast startup: ``speedup --help`` and ``speedup list`` never import torch, and what ``list``
reads from source files is exactly what the registries hold once everything is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from speedup.config import recipe_names, resolve_recipe
from speedup.data import DATASETS
from speedup.listing import summary
from speedup.models import MODELS
from speedup.optim import SCHEDULES, optimizer_names
from speedup.registry import Registry

# Runs the CLI in a fresh interpreter, then reports which heavy modules it imported.
PROBE = """
import contextlib, io, json, sys
from speedup.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:  # --help
        code = exit.code
heavy = sorted(m for m in ("torch", "numpy", "matplotlib", "omegaconf", "transformers")
               if m in sys.modules)
plugins = sorted(m for m in sys.modules if m.startswith("speedup_test_plugin"))
print(json.dumps({"code": code, "out": out.getvalue(), "heavy": heavy, "plugins": plugins}))
"""


def probe(*args: str, env: dict | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def parse_listing(text: str) -> dict[str, list[tuple[str, str]]]:
    """``speedup list`` output back into {kind: [(name, summary)]}."""
    kinds: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.startswith(" "):
            current = kinds.setdefault(line.rstrip(":"), [])
        elif line.strip() != "(none)":
            name, _, summary = line.strip().partition("  ")
            current.append((name, summary.strip()))
    return kinds


def first_line(obj: object) -> str:
    """What the listing shows for an imported object: its docstring's first sentence."""
    return summary(getattr(obj, "__doc__", None))


def imported(registry: Registry) -> list[tuple[str, str]]:
    return [(name, first_line(registry.get(name))) for name in registry.names()]


@pytest.fixture
def warm_optimizer_cache(tmp_path, monkeypatch):
    """A private cache, filled the slow way (this process has torch already)."""
    monkeypatch.setenv("SPEEDUP_CACHE", str(tmp_path / "cache"))
    from speedup.listing import listing

    listing("optimizers")
    return {"SPEEDUP_CACHE": str(tmp_path / "cache")}


def test_help_imports_nothing_heavy():
    result = probe("--help")
    assert result["code"] == 0 and result["heavy"] == []
    assert "report" in result["out"] and "list" in result["out"]


def test_list_algorithms_without_torch_equals_the_registry():
    result = probe("list", "algorithms")
    assert result["code"] == 0
    assert "torch" not in result["heavy"], result["heavy"]
    listed = parse_listing(result["out"])["algorithms"]
    # A fresh registry, as a new process has it (the test modules register extra ones).
    expected = imported(Registry("algorithm", group="speedup.algorithms"))
    assert listed == expected
    from speedup.algorithms.label_smoothing import LabelSmoothing

    assert ("label_smoothing", first_line(LabelSmoothing)) in listed


def test_list_everything_without_torch_equals_the_registries(warm_optimizer_cache):
    result = probe("list", env=warm_optimizer_cache)
    assert result["code"] == 0
    assert "torch" not in result["heavy"] and "numpy" not in result["heavy"], result["heavy"]
    listed = parse_listing(result["out"])
    assert list(listed) == [
        "algorithms",
        "recipes",
        "models",
        "datasets",
        "callbacks",
        "optimizers",
        "schedules",
    ]
    assert listed["models"] == imported(MODELS)
    assert listed["datasets"] == imported(DATASETS)
    assert listed["callbacks"] == imported(Registry("callback", group="speedup.callbacks"))
    assert [n for n, _ in listed["recipes"]] == recipe_names()
    quickstart = resolve_recipe("quickstart").read_text().splitlines()[0].lstrip("# ")
    assert ("quickstart", quickstart) in listed["recipes"]
    assert [n for n, _ in listed["optimizers"]] == optimizer_names()
    assert [n for n, _ in listed["schedules"]] == list(SCHEDULES)


def test_optimizer_names_are_cached_per_installed_versions(warm_optimizer_cache, tmp_path):
    from speedup.listing import listing

    (cached,) = (tmp_path / "cache" / "listing").glob("optimizers-*.json")
    assert json.loads(cached.read_text()) == optimizer_names()
    warm = probe("list", "optimizers", env=warm_optimizer_cache)
    assert "torch" not in warm["heavy"]
    assert [n for n, _ in parse_listing(warm["out"])["optimizers"]] == optimizer_names()
    cached.write_text('["half-written')  # a damaged cache is recomputed, and repaired
    assert [n for n, _ in listing("optimizers")] == optimizer_names()
    assert json.loads(cached.read_text()) == optimizer_names()


@pytest.fixture
def plugin_path(tmp_path):
    """A third-party package registering two algorithms through the entry-point group: one a
    plain class (read from source), one an alias (found only by importing the module)."""
    package = tmp_path / "speedup_test_plugin"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            '''
            class Sharpen:
                """Sharpen every batch (a test plugin).

                More words that the listing does not show.
                """


            class _Hidden:
                """Found by importing: the entry point names an alias."""


            Alias = _Hidden
            '''
        )
    )
    info = tmp_path / "speedup_test_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: speedup-test-plugin\n")
    (info / "entry_points.txt").write_text(
        "[speedup.algorithms]\n"
        "zz_sharpen = speedup_test_plugin:Sharpen\n"
        "zz_alias = speedup_test_plugin:Alias\n"
    )
    return str(tmp_path)


def test_plugins_are_listed_from_their_source(plugin_path):
    env = {"PYTHONPATH": os.pathsep.join([plugin_path, os.environ.get("PYTHONPATH", "")])}
    result = probe("list", "algorithms", env=env)
    rows = dict(parse_listing(result["out"])["algorithms"])
    assert rows["zz_sharpen"] == "Sharpen every batch (a test plugin)."
    assert rows["zz_alias"] == "Found by importing: the entry point names an alias."
    assert "torch" not in result["heavy"]
    assert result["plugins"] == ["speedup_test_plugin"]  # imported for the alias only


def test_list_unknown_kind_is_a_clear_error(capsys):
    from speedup.cli import main

    assert main(["list", "algorithm"]) == 2
    err = capsys.readouterr().err
    assert "cannot list 'algorithm' (did you mean 'algorithms'?)" in err and "schedules" in err
