"""An experiment directory is keyed by its settings: a rerun with other settings into the same
directory is refused (exit 2, naming what differs) and leaves every file as it was; only
``levels`` and ``controls`` may change, since they only add or leave out runs."""

from __future__ import annotations

import json

import pytest
import torch
from speedup.lottery.imp import IMPSettings, run_imp
from speedup.lottery.runs import INPUTS, initial_weights, train_run

from speedup.cli import main
from speedup.config import ConfigError, load_config

TINY = [
    "max_duration=4ba",
    "data.train_samples=128",
    "data.eval_samples=64",
    "data.batch_size=32",
    "eval_interval=0ba",
    "model.channels=8",
    "progress_bar=false",
    "threads=1",
]


def _snapshot(root) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def test_other_settings_or_config_are_refused_and_nothing_is_touched(tmp_path):
    cfg = load_config("quickstart", TINY)
    settings = IMPSettings(levels=1, prune_fraction=0.5, controls=())
    first = run_imp(cfg, tmp_path, settings)
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"prune_fraction: 0\.5 there, 0\.3 now") as err:
        run_imp(cfg, tmp_path, IMPSettings(levels=1, prune_fraction=0.3, controls=()))
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ConfigError, match=r"mode: \"weights\" there, \"lr\" now; rewind: "):
        run_imp(cfg, tmp_path, IMPSettings(levels=1, prune_fraction=0.5, rewind="2ba", mode="lr"))
    other = load_config("quickstart", [*TINY, "optimizer.lr=0.02"])
    with pytest.raises(ConfigError, match=r"optimizer\.lr: 0\.01 there, 0\.02 now"):
        run_imp(other, tmp_path, settings)
    assert _snapshot(tmp_path) == before  # settings.json, masks and runs as they were
    # A directory from before experiment.json: its settings.json is compared instead.
    recorded = (tmp_path / "experiment.json").read_bytes()
    (tmp_path / "experiment.json").unlink()
    with pytest.raises(ConfigError, match=r"prune_fraction: 0\.5 there, 0\.3 now"):
        run_imp(cfg, tmp_path, IMPSettings(levels=1, prune_fraction=0.3, controls=()))
    assert not (tmp_path / "experiment.json").exists()
    (tmp_path / "experiment.json").write_bytes(recorded)
    before = _snapshot(tmp_path)

    # More levels (or other controls) extend the same experiment: level 1 is read back.
    more = run_imp(cfg, tmp_path, IMPSettings(levels=2, prune_fraction=0.5, controls=("random",)))
    assert (
        more[:2][0] == first[0] and more[1]["accuracy"]["ticket"] == first[1]["accuracy"]["ticket"]
    )
    for name in ("main/final.pt", "masks.pt"):
        path = tmp_path / "level_1" / name
        assert before[path] == (path.stat().st_mtime_ns, path.read_bytes())
    assert (tmp_path / "level_2" / "random" / "final.pt").exists()
    assert json.loads((tmp_path / "settings.json").read_text())["levels"] == 2


def test_a_run_directory_refuses_other_inputs(tmp_path):
    cfg = load_config("quickstart", TINY)
    shape = initial_weights(cfg)["net.head.weight"].shape
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, : shape[1] // 4] = True
    masks = {"net.head.weight": mask}
    done = train_run(cfg, tmp_path / "r", masks=masks)
    assert train_run(cfg, tmp_path / "r", masks=masks) == done  # same inputs: read back
    with pytest.raises(ConfigError, match=r"masks differ"):
        train_run(cfg, tmp_path / "r", masks={"net.head.weight": ~mask})
    with pytest.raises(ConfigError, match=r"start step: 0 there, 2 now"):
        train_run(cfg, tmp_path / "r", masks=masks, start_batch=2)
    with pytest.raises(ConfigError, match=r"data_seed: null there, 5 now"):
        train_run(cfg, tmp_path / "r", masks=masks, data_seed=5)

    # A directory from before inputs.json: its config.yaml is compared, then recorded.
    (tmp_path / "r" / INPUTS).unlink()
    with pytest.raises(ConfigError, match=r"model\.channels: 8 there, 16 now"):
        train_run(load_config("quickstart", [*TINY, "model.channels=16"]), tmp_path / "r")
    assert not (tmp_path / "r" / INPUTS).exists()
    assert train_run(cfg, tmp_path / "r", masks=masks) == done
    assert json.loads((tmp_path / "r" / INPUTS).read_text())["model.channels"] == 8


def test_cli_exits_2_naming_the_settings_that_differ(tmp_path, capsys):
    out = str(tmp_path / "exp")
    base = ["lottery", "quickstart", "--smoke", "--levels", "1", "--controls", "--out", out]
    assert main([*base, "--prune-fraction", "0.5"]) == 0
    settings = (tmp_path / "exp" / "settings.json").read_bytes()
    masks = (tmp_path / "exp" / "level_1" / "masks.pt").read_bytes()
    capsys.readouterr()
    assert main([*base, "--prune-fraction", "0.4", "--scope", "global"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "prune_fraction: 0.5 there, 0.4 now" in err and 'scope: "layerwise" there' in err
    assert (tmp_path / "exp" / "settings.json").read_bytes() == settings
    assert (tmp_path / "exp" / "level_1" / "masks.pt").read_bytes() == masks
