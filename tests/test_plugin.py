"""The example plugin (examples/speedup-example-plugin), installed for real with pip, is found
through its entry points by fresh ``python -m speedup`` processes: listed, described, planned
and trained, with its effect in the run's metrics.jsonl.

pip installs it (no network: ``--no-deps --no-build-isolation --no-index``) into a temporary
``--target`` folder that only this module's subprocesses see (``PYTHONPATH``), from a copy
of the source: the shared environment and the checkout are left exactly as they were, so
other tests (the catalogue's exact list of algorithms) never see the plugin, and every run
of this module starts from a fresh install.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from _helpers import (
    environment_with_path,
    pip_install_into,
    speedup_output,
    speedup_process,
)

from speedup.algorithm import ALGORITHMS
from speedup.testing import check_algorithm

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "speedup-example-plugin"
RECIPE = PLUGIN / "recipes" / "quickstart-gradient-noise.yaml"


def _import_plugin_module(name: str):
    """Import a plugin module from the source tree without installing or touching sys.path."""
    package = "speedup_example_plugin"
    if package not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            package,
            PLUGIN / package / "__init__.py",
            submodule_search_locations=[str(PLUGIN / package)],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return sys.modules[f"{package}.{name}"]


# -- fast: the plugin's code, in this process -------------------------------------------------


def test_entry_points_name_the_plugin_classes():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text(encoding="utf-8"))
    groups = project["project"]["entry-points"]
    assert groups["speedup.algorithms"] == {
        "gradient_noise": "speedup_example_plugin.gradient_noise:GradientNoise"
    }
    assert groups["speedup.callbacks"] == {
        "grad_norm_monitor": "speedup_example_plugin.grad_norm:GradNormMonitor"
    }
    for target in [*groups["speedup.algorithms"].values(), *groups["speedup.callbacks"].values()]:
        module, _, attribute = target.partition(":")
        assert hasattr(_import_plugin_module(module.rpartition(".")[2]), attribute)


@pytest.mark.usefixtures("one_thread")
def test_gradient_noise_conforms_and_is_not_installed_here():
    noise = _import_plugin_module("gradient_noise")
    assert "gradient_noise" not in ALGORITHMS  # this process never sees the installed plugin
    report = check_algorithm(noise.GradientNoise, kwargs={"eta": 0.3})
    assert report.applied == {"after_train_batch": 20}
    assert report.state_dict_keys == []  # seeded by (seed, step): nothing to save


def test_the_functional_twin_adds_noise_of_the_annealed_variance():
    import torch

    noise = _import_plugin_module("gradient_noise")
    assert noise.noise_std(0, 0.01) == pytest.approx(0.1)
    assert noise.noise_std(9, 1.0, 0.55) == pytest.approx(10**-0.275)
    weight = torch.nn.Parameter(torch.zeros(200, 500))
    weight.grad = torch.zeros_like(weight)
    frozen = torch.nn.Parameter(torch.zeros(3))  # no gradient: skipped
    before = noise.add_gradient_noise([weight, frozen], 0.3, torch.Generator().manual_seed(0))
    assert float(before) == 0.0 and frozen.grad is None
    assert float(weight.grad.std()) == pytest.approx(0.3, rel=0.01)
    assert abs(float(weight.grad.mean())) < 0.01


def test_bad_arguments_name_the_key():
    noise = _import_plugin_module("gradient_noise")
    monitor = _import_plugin_module("grad_norm")
    with pytest.raises(ValueError, match=r"gradient_noise\.eta must be > 0, got -1"):
        noise.GradientNoise(eta=-1)
    with pytest.raises(ValueError, match=r"grad_norm_monitor\.every must be an integer >= 1"):
        monitor.GradNormMonitor(every=0)


# -- slow: installed with pip, used through the CLI -------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """Install the plugin; return the environment that makes subprocesses see it."""
    root = tmp_path_factory.mktemp("plugin")
    source, site = root / "source", root / "site"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    env = pip_install_into(source, site)
    assert (site / "speedup_example_plugin-0.1.0.dist-info" / "entry_points.txt").is_file()
    return env


def speedup(env: dict[str, str], *args: str) -> str:
    return speedup_output(*args, env=env)


@pytest.mark.slow
def test_installed_plugin_is_listed_and_described(installed):
    algorithms = speedup(installed, "list", "algorithms")
    assert "gradient_noise" in algorithms and "Annealed Gaussian gradient noise" in algorithms
    assert "label_smoothing" in algorithms  # the built-ins are still there
    assert "grad_norm_monitor" in speedup(installed, "list", "callbacks")
    card = speedup(installed, "describe", "gradient_noise")
    assert "speedup_example_plugin.gradient_noise.GradientNoise" in card
    for heading in ("What.", "When it helps.", "Composes badly with."):
        assert heading in card  # as plain text: describe strips the markup
    assert "**" not in card
    assert "AFTER_TRAIN_BATCH: reads model.grads, timestamp; writes model.grads" in card
    assert "runs_after: gradient_clipping, sam" in card
    assert "every: int = 10" in speedup(installed, "describe", "grad_norm_monitor")


@pytest.mark.slow
def test_installed_plugin_recipe_is_planned(installed):
    plan = speedup(installed, "plan", str(RECIPE))
    assert "AFTER_TRAIN_BATCH:\n  1. gradient_noise" in plan
    assert "no conflicts" in plan
    # Composed with the built-ins it declares an order with: SAM, clipping, then the noise.
    plan = speedup(
        installed, "plan", str(RECIPE), "algorithms.gradient_clipping={}", "algorithms.sam={}"
    )
    assert "1. sam" in plan and "2. gradient_clipping" in plan and "3. gradient_noise" in plan


@pytest.mark.slow
def test_installed_plugin_trains_and_its_effect_is_in_the_metrics(installed, tmp_path):
    run_dir = tmp_path / "run"
    speedup(installed, "run", str(RECIPE), "--smoke", f"run_dir={run_dir}", "progress_bar=false")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    noise = {r["step"]: r for r in records if "gradient_noise/std" in r}
    after = {r["step"]: r["grad/norm"] for r in records if "grad/norm" in r}
    assert sorted(noise) == sorted(after) == [0, 1, 2, 3]  # every smoke step, both logged
    # The same model as the quickstart's: count its gradient entries.
    from speedup.config import load_config
    from speedup.run import build_trainer

    model = build_trainer(load_config("quickstart", smoke=True)).state.model
    entries = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for step, record in noise.items():
        std = record["gradient_noise/std"]
        assert std == pytest.approx(math.sqrt(0.01 / (1 + step) ** 0.55))
        # Independent noise adds its energy: |g + z|^2 ~ |g|^2 + n std^2 (n ~ 10^4: +-2%).
        before = record["gradient_noise/grad_norm"]
        expected = math.sqrt(before**2 + entries * std**2)
        assert after[step] == pytest.approx(expected, rel=0.1)
        assert after[step] > 5 * before
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["recipe"] == "quickstart-gradient-noise"


# -- a broken plugin ----------------------------------------------------------------------------


def _broken_distribution(root: Path) -> dict:
    """A distribution on the path whose algorithm entry point names a module that is not there
    (an uninstalled dependency, a typo); returns the environment that sees it."""
    info = root / "broken_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[speedup.algorithms]\nghost_algo = broken_plugin_missing.module:Ghost\n"
    )
    return environment_with_path(root)


def test_a_broken_plugin_is_skipped_with_one_warning(tmp_path):
    env = _broken_distribution(tmp_path)
    done = speedup_process("list", "algorithms", env=env)
    assert done.returncode == 0, done.stderr
    assert "label_smoothing" in done.stdout and "ghost_algo" not in done.stdout
    warnings = [line for line in done.stderr.splitlines() if "ghost_algo" in line]
    assert len(warnings) == 1
    assert "broken_plugin_missing" in warnings[0] and "broken-plugin" in warnings[0]

    # Using it by name is a one-line error naming the plugin, exit 2.
    done = speedup_process("describe", "ghost_algo", env=env)
    assert done.returncode == 2
    assert "ghost_algo" in done.stderr and "cannot be loaded" in done.stderr
    assert "Traceback" not in done.stderr
