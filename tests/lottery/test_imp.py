"""Iterative magnitude pruning: per-level pruning math, controls, resumption, reports."""

import json
from pathlib import Path

import pytest
import torch
from speedup.lottery import imp
from speedup.lottery.imp import IMPSettings, layer_fractions, prune_surviving, run_imp
from speedup.lottery.runs import initial_weights, load_result, train_run
from torch import nn

from speedup.cli import main
from speedup.config import ConfigError, load_config, with_changes

TINY = [
    "max_duration=6ba",
    "data.train_samples=256",
    "data.eval_samples=128",
    "data.batch_size=32",
    "eval_interval=3ba",
    "progress_bar=false",
    "threads=1",  # tiny ops: a second thread only spins on a busy machine
]


def test_prune_surviving_layerwise_prunes_a_fraction_of_survivors():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(10, 10, generator=g), "b": torch.randn(50, generator=g)}
    masks = prune_surviving(weights, None, {"a": 0.2, "b": 0.1})
    assert int(masks["a"].sum()) == 80 and int(masks["b"].sum()) == 45
    again = prune_surviving(weights, masks, {"a": 0.2, "b": 0.2})
    assert int(again["a"].sum()) == 64 and int(again["b"].sum()) == 36
    assert bool((again["a"] <= masks["a"]).all())  # masks only shrink
    kept = weights["a"].abs()[again["a"]].min()
    assert kept >= weights["a"].abs()[masks["a"] & ~again["a"]].max()


def test_prune_surviving_global_counts():
    weights = {"big": torch.full((10,), 5.0), "small": torch.arange(1.0, 11.0) / 100}
    masks = prune_surviving(weights, None, {"big": 0.5, "small": 0.5}, scope="global")
    assert bool(masks["big"].all()) and not bool(masks["small"].any())


def test_layer_fractions_follow_the_lth_paper():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 8), nn.Linear(8, 2))
    names = ["0.weight", "2.weight", "3.weight"]
    fractions = layer_fractions(model, names, IMPSettings(prune_fraction=0.2, conv_fraction=0.1))
    assert fractions == {"0.weight": 0.1, "2.weight": 0.2, "3.weight": 0.1}  # output at half


def test_settings_are_validated():
    with pytest.raises(ValueError, match="prune_fraction"):
        IMPSettings(prune_fraction=1.5)
    with pytest.raises(ValueError, match="unknown controls"):
        IMPSettings(controls=("bogus",))


def test_imp_levels_controls_reports_and_resumption(tmp_path):
    cfg = load_config("quickstart", TINY)
    settings = IMPSettings(levels=2, prune_fraction=0.5, output_fraction=0.5)
    rows = run_imp(cfg, tmp_path, settings)
    assert [r["level"] for r in rows] == [0, 1, 2]
    assert rows[0]["density"] == 1.0
    assert rows[1]["density"] == pytest.approx(0.5, abs=0.01)
    assert rows[2]["density"] == pytest.approx(0.25, abs=0.01)
    for row in rows[1:]:
        assert set(row["accuracy"]) == {"ticket", "reinit", "random", "shuffle"}
        assert all(0.0 <= v <= 1.0 for v in row["accuracy"].values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["levels"] == rows and summary["settings"]["levels"] == 2
    assert "| 2 | 0.25" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "accuracy_vs_density.png").stat().st_size > 1000

    masks = torch.load(tmp_path / "level_2" / "masks.pt", weights_only=True)
    level1 = torch.load(tmp_path / "level_1" / "masks.pt", weights_only=True)
    assert all(bool((masks[k] <= level1[k]).all()) for k in masks)
    final = load_result(tmp_path / "level_2" / "main").final_weights
    assert all(torch.all(final[k][~m] == 0) for k, m in masks.items())

    # exact per-layer sparsity: each level keeps (1 - fraction) of each layer's survivors
    for name, mask in masks.items():
        alive = int(level1[name].sum())
        assert abs(int(mask.sum()) - alive * 0.5) <= 0.5
    # controls keep the ticket's per-layer sparsity (and random/shuffle change the pattern)
    for control in ("reinit", "random", "shuffle"):
        control_masks = torch.load(tmp_path / "level_2" / control / "masks.pt", weights_only=True)
        for name, mask in masks.items():
            assert int(control_masks[name].sum()) == int(mask.sum())
        changed = any(not torch.equal(control_masks[n], masks[n]) for n in masks)
        assert changed == (control != "reinit")

    # Interrupt level 2: only its runs are recomputed, earlier ones are kept as they are.
    kept = (tmp_path / "level_1" / "main" / "summary.json").stat().st_mtime_ns
    (tmp_path / "level_2" / "main" / "summary.json").unlink()
    again = run_imp(cfg, tmp_path, settings)
    assert (tmp_path / "level_1" / "main" / "summary.json").stat().st_mtime_ns == kept
    assert (tmp_path / "level_2" / "main" / "summary.json").exists()
    assert [r["density"] for r in again] == [r["density"] for r in rows]


def test_weight_rewinding_to_step_k_pretrains_then_restarts_there(tmp_path):
    cfg = load_config("quickstart", TINY)
    rows = run_imp(cfg, tmp_path, IMPSettings(levels=1, rewind="2ba", controls=()))
    pretrain = load_result(tmp_path / "pretrain")
    assert pretrain["steps"] == 2  # stopped at the rewind point, schedule of the full run
    main = load_result(tmp_path / "level_1" / "main")
    assert main["start_batch"] == 2 and main["steps"] == 6
    assert rows[1]["accuracy"] == {"ticket": main["metrics"]["accuracy"]}


def test_train_run_holds_fixed_masks_and_skips_finished_runs(tmp_path):
    cfg = load_config("quickstart", TINY)
    weight = "net.head.weight"
    mask = torch.zeros(10, 160, dtype=torch.bool)
    mask[:, :40] = True
    result = train_run(cfg, tmp_path / "r", masks={weight: mask})
    final = result.final_weights
    assert torch.all(final[weight][~mask] == 0) and torch.any(final[weight][mask] != 0)
    stamp = (tmp_path / "r" / "summary.json").stat().st_mtime_ns
    assert train_run(cfg, tmp_path / "r", masks={weight: mask}) == result
    assert (tmp_path / "r" / "summary.json").stat().st_mtime_ns == stamp


def lottery(out: Path, *flags: str) -> int:
    """``speedup lottery quickstart --smoke FLAGS --out OUT``: its exit code."""
    return main(["lottery", "quickstart", "--smoke", *flags, "--out", str(out)])


def test_cli_lottery_smoke(capsys, tmp_path):
    code = lottery(tmp_path, "--levels", "1", "--controls", "reinit")
    out = capsys.readouterr().out
    assert code == 0
    assert "| level | density | ticket | reinit |" in out and f"experiment dir: {tmp_path}" in out
    code = lottery(tmp_path / "x", "--prune-fraction", "2")
    assert code == 2 and "prune_fraction must be in (0, 1)" in capsys.readouterr().err
    assert lottery(tmp_path / "ft", "--mode", "finetune") == 2  # the quickstart's cosine ends at 0
    assert "scheduler 'cosine' ends at 0" in capsys.readouterr().err
    assert lottery(tmp_path, "--mode", "lr", "--finetune-lr", "0.1") == 2
    assert "finetune_lr is the LR of mode finetune only" in capsys.readouterr().err


def test_cli_seeds_average_and_other_experiments(capsys, tmp_path):
    code = lottery(tmp_path / "imp", "--levels", "1", "--controls", "random", "--seeds", "1", "2")
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "imp" / "summary.json").read_text())
    assert summary["levels"][1]["seeds"] == 2
    level = summary["levels"][1]
    values = []
    for seed in (1, 2):
        per_seed = json.loads((tmp_path / "imp" / f"seed_{seed}" / "summary.json").read_text())
        values.append(per_seed["levels"][1]["accuracy"]["random"])
    mean = (values[0] + values[1]) / 2
    sample_std = abs(values[0] - values[1]) / 2**0.5  # ddof=1 with two values
    assert level["accuracy"]["random"] == pytest.approx(mean)
    assert level["accuracy_std"]["random"] == pytest.approx(sample_std)
    assert code == 0 and f"{mean:.4f} ± {sample_std:.4f} (n=2)" in out
    assert (tmp_path / "imp" / "seed_1" / "level_1" / "random").is_dir()

    code = lottery(
        tmp_path / "inst", "--instability", "--rewind-points", "0ba", "2ba", "--points", "3"
    )
    out = capsys.readouterr().out
    assert code == 0 and "rewind 0: error barrier" in out and "rewind 2: error barrier" in out
    assert (tmp_path / "inst" / "instability.json").exists()
    assert (tmp_path / "inst" / "instability.png").stat().st_size > 1000

    code = lottery(tmp_path / "pai", "--pai", "magnitude", "--densities", "0.3")
    assert code == 0 and "magnitude density 0.3000" in capsys.readouterr().out
    assert json.loads((tmp_path / "pai" / "pai.json").read_text())[0]["method"] == "magnitude"


SMALL = [
    "max_duration=4ba",
    "data.train_samples=128",
    "data.eval_samples=64",
    "data.batch_size=32",
    "eval_interval=0ba",
    "log_interval=1ba",
    "model.channels=8",
    "progress_bar=false",
    "threads=1",
]


@pytest.fixture
def started(monkeypatch) -> dict:
    """Records what each lottery run starts from: run directory name -> train_run kwargs."""
    calls: dict = {}

    def spy(cfg, run_dir, **kwargs):
        calls[f"{run_dir.parent.name}/{run_dir.name}"] = kwargs
        return train_run(cfg, run_dir, **kwargs)

    monkeypatch.setattr(imp, "train_run", spy)
    return calls


def _expect_same(weights: dict, expected: dict) -> None:
    assert list(weights) == list(expected)
    for name, value in expected.items():
        assert torch.equal(weights[name], value), name


def _masked_copy(weights: dict, masks: dict) -> dict:
    return {k: v * masks[k] if k in masks else v for k, v in weights.items()}


def test_lr_rewinding_controls_start_from_the_trained_weights(tmp_path, started):
    cfg = load_config("quickstart", SMALL)
    run_imp(cfg, tmp_path, IMPSettings(levels=2, prune_fraction=0.5, mode="lr"))
    trained = load_result(tmp_path / "level_1" / "main").final_weights
    survivors = torch.load(tmp_path / "level_1" / "masks.pt", weights_only=True)
    ticket = torch.load(tmp_path / "level_2" / "masks.pt", weights_only=True)
    _expect_same(started["level_2/main"]["weights"], _masked_copy(trained, ticket))
    for control in ("random", "shuffle"):
        masks = torch.load(tmp_path / "level_2" / control / "masks.pt", weights_only=True)
        assert started[f"level_2/{control}"]["start_batch"] == 0
        # the ticket's start weights, re-pruned at random among the previous survivors
        _expect_same(started[f"level_2/{control}"]["weights"], _masked_copy(trained, masks))
        for name, mask in masks.items():
            assert not (mask & ~survivors[name]).any(), (control, name)
            assert int(mask.sum()) == int(ticket[name].sum())
        assert any(not torch.equal(masks[n], ticket[n]) for n in ticket)
    fresh = initial_weights(with_changes(cfg, seed=cfg.seed + 1000 + 2))
    _expect_same(started["level_2/reinit"]["weights"], _masked_copy(fresh, ticket))


def test_finetune_trains_the_trained_weights_at_the_final_lr(tmp_path, started):
    def logged_lrs(run: str) -> list[float]:
        lines = (tmp_path / "ft" / run / "metrics.jsonl").read_text().splitlines()
        return [r["lr"] for r in map(json.loads, lines) if "lr" in r]

    cosine = load_config("quickstart", SMALL)  # cosine to 0: fine-tuning would not train
    with pytest.raises(ConfigError, match="ends at 0: .* set finetune_lr"):
        run_imp(cosine, tmp_path / "zero", IMPSettings(levels=1, mode="finetune", controls=()))
    assert not (tmp_path / "zero").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="finetune_lr is the LR of mode finetune only"):
        IMPSettings(finetune_lr=0.1)

    overrides = [*SMALL, "scheduler.name=linear", "scheduler.end_factor=0.25"]
    linear = load_config("quickstart", overrides)
    settings = IMPSettings(levels=1, mode="finetune", controls=("random",))
    run_imp(linear, tmp_path / "ft", settings)
    final_lr = linear.optimizer.lr * 0.25  # the linear schedule's value at its end
    assert len(set(logged_lrs("level_0/main"))) > 1  # the dense level follows the schedule
    for run in ("level_1/main", "level_1/random"):
        assert logged_lrs(run) == pytest.approx([final_lr] * 4)
    trained = load_result(tmp_path / "ft" / "level_0" / "main").final_weights
    ticket = torch.load(tmp_path / "ft" / "level_1" / "masks.pt", weights_only=True)
    _expect_same(started["level_1/main"]["weights"], _masked_copy(trained, ticket))

    given = IMPSettings(levels=1, mode="finetune", controls=(), finetune_lr=0.003)
    run_imp(cosine, tmp_path / "given", given)
    lines = (tmp_path / "given" / "level_1" / "main" / "metrics.jsonl").read_text().splitlines()
    assert [r["lr"] for r in map(json.loads, lines) if "lr" in r] == pytest.approx([0.003] * 4)
