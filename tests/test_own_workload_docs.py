"""docs/your-own-data-and-model.md runs as written: its builders, registered from Python,
train its recipe in this process; installed with pip from its own pyproject.toml, they are
found through the entry points by fresh ``python -m speedup`` processes.

The page's code blocks are the source of every file here (nothing is retyped), so the page
cannot drift from what works. The Python registrations go into copies of the registries that
are restored afterwards, and the package is installed into a temporary ``--target`` that only
this module's subprocesses see: other tests never meet ``tiny_mlp`` or ``noisy_sines``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from _helpers import pip_install_into, speedup_output

from speedup.data import DATASETS
from speedup.models import MODELS

PAGE = Path(__file__).resolve().parents[1] / "docs" / "your-own-data-and-model.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def write_example(folder: Path) -> None:
    """my_workloads.py, my-recipe.yaml and pyproject.toml, from the page's blocks."""
    module, recipe = blocks("python")[0], blocks("yaml")[0]
    assert module.startswith("# my_workloads.py\n") and recipe.startswith("# my-recipe.yaml\n")
    (folder / "my_workloads.py").write_text(module, encoding="utf-8")
    (folder / "my-recipe.yaml").write_text(recipe, encoding="utf-8")
    (folder / "pyproject.toml").write_text(blocks("toml")[0], encoding="utf-8")


def test_the_page_links_from_the_readme():
    readme = (PAGE.parents[1] / "README.md").read_text(encoding="utf-8")
    assert "(docs/your-own-data-and-model.md)" in readme


def test_registered_from_python_the_recipe_trains(tmp_path, monkeypatch, capsys):
    write_example(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(MODELS, "_items", dict(MODELS._items))  # restored after the test
    monkeypatch.setattr(DATASETS, "_items", dict(DATASETS._items))
    monkeypatch.delitem(sys.modules, "my_workloads", raising=False)
    namespace: dict = {}
    exec(blocks("python")[1], namespace)
    summary = namespace["summary"]
    assert "tiny_mlp" in MODELS and "noisy_sines" in DATASETS
    # 4 classes: chance is 0.25; the sines are easy to tell apart through the noise.
    assert summary["metrics"]["accuracy"] > 0.8
    assert summary["steps"] == 5 * (2000 // 64)  # 5 epochs of full batches (drop_last)
    run_dir = tmp_path / "runs" / "my-recipe"
    config = (run_dir / "config.yaml").read_text()
    assert "name: tiny_mlp" in config and "name: noisy_sines" in config
    assert str(summary["metrics"]) in capsys.readouterr().out

    from speedup.config import ConfigError, load_config

    # The builders' signatures are the schema: a typo is an error naming the allowed keys.
    with pytest.raises(ConfigError, match=r"model\.hiden: unknown key .*allowed: hidden"):
        load_config("my-recipe.yaml", ["model.hiden=3"])
    with pytest.raises(ConfigError, match=r"data\.noise: wrong type: got 'loud'"):
        load_config("my-recipe.yaml", ["data.noise=loud"])


@pytest.mark.slow
def test_installed_with_entry_points_the_command_line_finds_them(tmp_path):
    source, site = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    write_example(source)
    env = pip_install_into(source, site)
    work = tmp_path / "work"
    work.mkdir()
    (work / "my-recipe.yaml").write_text(blocks("yaml")[0], encoding="utf-8")

    listed = speedup_output("list", "models", "datasets", env=env, cwd=work)
    assert re.search(r"tiny_mlp\s+One hidden layer over the flattened input\.", listed)
    assert re.search(r"noisy_sines\s+Sine waves of 1 to 4 periods per window", listed)
    assert "mnist1d" in listed  # the built-ins are still there
    speedup_output("run", "my-recipe.yaml", "--smoke", "run_dir=smoke", env=env, cwd=work)
    summary = json.loads((work / "smoke" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["recipe"] == "my-recipe"
    assert "tiny_mlp" in (work / "smoke" / "config.yaml").read_text()
