"""Instability analysis (linear mode connectivity): interpolation, barrier, path, experiment."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from speedup.lottery import instability
from speedup.lottery.instability import (
    error_barrier,
    evaluate_path,
    interpolate_weights,
    plot_instability,
    run_instability,
)
from speedup.lottery.runs import initial_weights

from speedup.cli import main
from speedup.config import ConfigError, load_config

# Tiny ops: one intra-op thread is as fast and does not spin on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


TINY = [
    "max_duration=30ba",
    "data.train_samples=512",
    "data.eval_samples=300",
    "data.batch_size=64",
    "eval_interval=0ba",
    "log_interval=0ba",
    "model.channels=8",
    "device=cpu",
]


def _pair() -> tuple[dict, dict]:
    # Dyadic values: the midpoint is exactly representable.
    a = {
        "w": torch.tensor([[0.0, 1.0], [2.0, -4.0]]),
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.tensor([True, False]),
    }
    b = {
        "w": torch.tensor([[1.0, 3.0], [-2.0, 4.0]]),
        "bn.num_batches_tracked": torch.tensor(11),
        "mask": torch.tensor([False, True]),
    }
    return a, b


def test_interpolation_endpoints_and_midpoint_are_exact():
    a, b = _pair()
    a["w"] = torch.randn(5, 3, dtype=torch.float32)
    b["w"] = torch.randn(5, 3, dtype=torch.float32)
    assert torch.equal(interpolate_weights(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate_weights(a, b, 1.0)["w"], b["w"])
    a, b = _pair()
    mid = interpolate_weights(a, b, 0.5)["w"]
    assert torch.equal(mid, torch.tensor([[0.5, 2.0], [0.0, 0.0]]))
    quarter = interpolate_weights(a, b, 0.25)["w"]
    assert torch.equal(quarter, torch.tensor([[0.25, 1.5], [1.0, -2.0]]))


def test_interpolation_takes_integer_and_bool_buffers_from_a():
    a, b = _pair()
    out = interpolate_weights(a, b, 0.5)
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out["bn.num_batches_tracked"]) == 7
    assert torch.equal(out["mask"], a["mask"])
    out["bn.num_batches_tracked"] += 1  # a copy, not a's tensor
    assert int(a["bn.num_batches_tracked"]) == 7


def test_interpolation_rejects_mismatched_state_dicts():
    a, b = _pair()
    with pytest.raises(ValueError, match="keys"):
        interpolate_weights(a, {k: v for k, v in b.items() if k != "w"}, 0.5)
    b["w"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shapes"):
        interpolate_weights(a, b, 0.5)


def test_error_barrier_on_hand_made_rows():
    rows = [
        {"alpha": 0.0, "error": 0.10},
        {"alpha": 0.5, "error": 0.40},
        {"alpha": 1.0, "error": 0.20},
    ]
    assert error_barrier(rows) == pytest.approx(0.40 - 0.15)
    flat = [{"alpha": a / 4, "error": 0.3} for a in range(5)]
    assert error_barrier(flat) == pytest.approx(0.0)
    # Order does not matter; a path better in the middle than at the ends is <= 0.
    dip = [
        {"alpha": 1.0, "error": 0.3},
        {"alpha": 0.0, "error": 0.1},
        {"alpha": 0.5, "error": 0.05},
    ]
    assert error_barrier(dip) == pytest.approx(0.3 - 0.2)
    with pytest.raises(ValueError):
        error_barrier(rows[:1])


def test_evaluate_path_of_a_network_with_itself_is_flat():
    cfg = load_config("quickstart", TINY)
    weights = initial_weights(cfg)
    rows = evaluate_path(cfg, weights, weights, points=3)
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert all(set(r) == {"alpha", "accuracy", "error", "loss"} for r in rows)
    assert all(abs(r["error"] + r["accuracy"] - 1) < 1e-12 for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert abs(error_barrier(rows)) < 1e-6
    assert max(r["loss"] for r in rows) - min(r["loss"] for r in rows) < 1e-6


def test_evaluate_path_applies_masks_and_rejects_one_point():
    cfg = load_config("quickstart", TINY)
    weights = initial_weights(cfg)
    masks = {
        name: torch.zeros_like(w, dtype=torch.bool)
        for name, w in weights.items()
        if name.endswith("weight") and w.dim() >= 2
    }
    rows = evaluate_path(cfg, weights, weights, points=2, masks=masks)
    # All weights pruned: the logits are the last bias only, the same for every input.
    assert rows[0]["accuracy"] < 0.3
    with pytest.raises(ValueError, match="points"):
        evaluate_path(cfg, weights, weights, points=1)


def test_run_instability_end_to_end_and_resumes(tmp_path, monkeypatch):
    cfg = load_config("quickstart", TINY)
    out = tmp_path / "lmc"
    results = run_instability(cfg, out, rewind_points=("0ba", "10ba"), points=5)
    assert [r["rewind"] for r in results] == [0, 10]
    for r in results:
        assert math.isfinite(r["barrier"]) and r["barrier"] >= -1e-6
        assert len(r["path"]) == 5
        assert r["endpoint_accuracy"] == [r["path"][0]["accuracy"], r["path"][-1]["accuracy"]]
        for seed in (1, 2):
            assert (out / f"rewind-{r['rewind']}ba" / f"seed-{seed}" / "summary.json").exists()
    assert (out / "pretrain-10ba" / "summary.json").exists()
    assert not (out / "pretrain-0ba").exists()  # step 0 is the initial weights themselves
    pre = json.loads((out / "pretrain-10ba" / "summary.json").read_text())
    copy = json.loads((out / "rewind-10ba" / "seed-1" / "summary.json").read_text())
    assert pre["steps"] == 10 and copy["start_batch"] == 10 and copy["steps"] == 30
    # Different data orders from the same weights give different networks.
    a = torch.load(out / "rewind-0ba" / "seed-1" / "final.pt", weights_only=True)
    b = torch.load(out / "rewind-0ba" / "seed-2" / "final.pt", weights_only=True)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((out / "instability.json").read_text())
    assert [r["barrier"] for r in saved] == pytest.approx([r["barrier"] for r in results])

    png = plot_instability(results, tmp_path / "plot" / "lmc.png")
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    files = sorted(out.rglob("final.pt")) + sorted(out.rglob("path.json"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    def no_eval(*args, **kwargs):
        raise AssertionError("the path evaluation was recomputed")

    monkeypatch.setattr(instability, "evaluate_path", no_eval)
    again = run_instability(cfg, out, rewind_points=("0ba", "10ba"), points=5)
    assert [r["barrier"] for r in again] == [r["barrier"] for r in results]
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes


def test_run_instability_rejects_bad_arguments(tmp_path):
    cfg = load_config("quickstart", TINY)
    with pytest.raises(ValueError, match="data_seeds"):
        run_instability(cfg, tmp_path, data_seeds=(3, 3))
    with pytest.raises(ValueError, match="outside"):
        run_instability(cfg, tmp_path, rewind_points=("30ba",))
    with pytest.raises(ConfigError, match=r"masks: net\.nope\.weight not prunable weights"):
        run_instability(cfg, tmp_path / "m", masks={"net.nope.weight": torch.ones(2, 2)})
    with pytest.raises(ConfigError, match=r"net\.head\.weight \(3, 3\) \(the weight is"):
        run_instability(cfg, tmp_path / "m", masks={"net.head.weight": torch.ones(3, 3)})
    assert not (tmp_path / "m").exists()  # refused before anything trained


def test_reset_bn_recomputes_running_statistics():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(3)

        def forward(self, batch: dict) -> torch.Tensor:
            return self.bn(batch["inputs"])

    torch.manual_seed(0)
    data = [{"inputs": torch.randn(64, 3) * 2 + 5} for _ in range(4)]
    model = Net()
    model.bn.running_mean.fill_(-100.0)  # an interpolated, meaningless statistic
    trainer = SimpleNamespace(
        state=SimpleNamespace(model=model, train_dataloader=data), _to_device=lambda b: b
    )
    instability._reset_bn(trainer, batches=3)
    seen = torch.cat([b["inputs"] for b in data[:3]])
    assert torch.allclose(model.bn.running_mean, seen.mean(0), atol=1e-5)
    # momentum=None: the running statistics are plain averages of the per-batch ones.
    per_batch_var = torch.stack([b["inputs"].var(0) for b in data[:3]]).mean(0)
    assert torch.allclose(model.bn.running_var, per_batch_var, rtol=1e-4)
    assert model.bn.momentum == 0.1  # restored


def test_cli_instability_of_a_sparse_ticket_over_seeds(tmp_path, capsys):
    from speedup.algorithms.magnitude_pruning import prunable_parameters

    from speedup.run import build_trainer

    model = build_trainer(load_config("quickstart", smoke=True)).state.model
    g = torch.Generator().manual_seed(0)
    masks = {
        n: torch.rand(w.shape, generator=g) < 0.4 for n, w in prunable_parameters(model).items()
    }
    torch.save(masks, tmp_path / "masks.pt")
    out = tmp_path / "lmc"
    args = ["lottery", "quickstart", "--smoke", "--instability", "--rewind-points", "2ba"]
    args += ["--points", "3", "--masks", str(tmp_path / "masks.pt")]
    assert main([*args, "--seeds", "1", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    barriers = []
    for seed in (1, 2):
        replicate = out / f"seed_{seed}"
        (result,) = json.loads((replicate / "instability.json").read_text())
        barriers.append(result["barrier"])
        dense = torch.load(replicate / "pretrain-2ba" / "final.pt", weights_only=True)
        for copy in (1, 2):  # the copies train m * W_k: W_k from dense training
            final = torch.load(
                replicate / "rewind-2ba" / f"sparse-seed-{copy}" / "final.pt", weights_only=True
            )
            for name, mask in masks.items():
                assert not final[name][~mask].any() and final[name][mask].any()
        assert all(dense[name][~mask].any() for name, mask in masks.items())
        assert f"seed: {seed}" in (replicate / "pretrain-2ba" / "config.yaml").read_text()
    (summary,) = json.loads((out / "instability.json").read_text())
    mean, std = sum(barriers) / 2, abs(barriers[0] - barriers[1]) / math.sqrt(2)
    assert summary["n"] == 2 and summary["barrier"] == pytest.approx(mean)
    assert summary["barrier_std"] == pytest.approx(std)
    assert f"rewind 2: error barrier {mean:.4f} ± {std:.4f} (n=2)" in printed
    assert (out / "instability.png").stat().st_size > 1000

    masks["net.head.weight"] = masks["net.head.weight"][:, :3]
    torch.save(masks, tmp_path / "bad.pt")
    bad = [*args[:-1], str(tmp_path / "bad.pt"), "--out", str(tmp_path / "bad")]
    assert main(bad) == 2 and "shapes differ" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "none.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["lottery", "quickstart", "--smoke", "--masks", str(tmp_path / "masks.pt")]) == 2
    assert "--masks applies to --instability only" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
