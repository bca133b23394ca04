import json

import pytest
import torch
import torch.nn.functional as F
from speedup.algorithms.magnitude_pruning import magnitude_masks, prunable_parameters
from speedup.lottery import pai
from speedup.lottery.pai import (
    grasp_scores,
    invert_scores,
    magnitude_scores,
    masks_from_scores,
    prune_at_init,
    random_scores,
    reinitialized_weights,
    run_pai,
    shuffle_layerwise,
    snip_scores,
    synflow_scores,
)
from speedup.lottery.runs import initial_weights
from torch import nn
from torch.func import functional_call

from speedup.cli import main
from speedup.config import ConfigError, load_config
from speedup.models import Classifier


def mlp(widths=(6, 16, 8, 3), seed=0, batchnorm=False):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers += [nn.BatchNorm1d(b)] if batchnorm else []
            layers.append(nn.Tanh())
    return Classifier(nn.Sequential(*layers), widths[-1])


def random_batches(n=2, rows=16, features=6, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "inputs": torch.randn(rows, features, generator=g),
            "targets": torch.randint(0, classes, (rows,), generator=g),
        }
        for _ in range(n)
    ]


def test_snip_is_abs_grad_times_weight_by_hand():
    torch.manual_seed(0)
    model = Classifier(nn.Linear(5, 3), 3)
    batch = random_batches(1, rows=10, features=5)[0]
    w, b = model.net.weight.detach(), model.net.bias.detach()
    x, y = batch["inputs"], batch["targets"]
    probs = torch.softmax(x @ w.T + b, dim=-1)
    grad = (probs - F.one_hot(y, 3).float()).T @ x / len(x)  # d mean-CE / dW
    scores = snip_scores(model, [batch])
    assert list(scores) == ["net.weight"]
    torch.testing.assert_close(scores["net.weight"], (grad * w).abs(), rtol=1e-5, atol=1e-7)


def test_snip_and_grasp_leave_the_model_as_it_was():
    model = mlp(batchnorm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fn in (snip_scores, grasp_scores):
        fn(model, random_batches())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats restored
    assert all(p.grad is None for p in model.parameters())


def test_grasp_equals_weight_times_explicit_hessian_gradient_product():
    model = mlp(widths=(3, 4, 2))
    batches = random_batches(2, rows=8, features=3, classes=2)
    weights = prunable_parameters(model)
    names, shapes = list(weights), [w.shape for w in weights.values()]
    sizes = [w.numel() for w in weights.values()]
    flat0 = torch.cat([w.detach().flatten() for w in weights.values()])

    def mean_loss(flat):
        params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        losses = [model.loss(functional_call(model, params, (b,)), b) for b in batches]
        return torch.stack(losses).mean()

    hessian = torch.autograd.functional.hessian(mean_loss, flat0)
    grad = torch.func.grad(mean_loss)(flat0)
    expected = flat0 * (hessian @ grad)
    scores = grasp_scores(model, batches)
    got = torch.cat([scores[n].flatten() for n in names])
    assert expected.abs().max() > 1e-4  # a non-trivial check
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.77])
def test_masks_keep_exactly_the_density(density):
    model = mlp(widths=(6, 33, 17, 3))
    scores = random_scores(model, torch.Generator().manual_seed(0))
    total = sum(s.numel() for s in scores.values())
    masks = masks_from_scores(scores, density, "global")
    assert sum(int(m.sum()) for m in masks.values()) == round(density * total)
    kept = torch.cat([scores[n][m] for n, m in masks.items()])
    dropped = torch.cat([scores[n][~m] for n, m in masks.items()])
    assert kept.min() >= dropped.max()  # the top scores
    for name, mask in masks_from_scores(scores, density, "layerwise").items():
        assert abs(int(mask.sum()) - density * mask.numel()) <= 1, name
    # ties (all-equal scores) still keep an exact count
    flat = {n: torch.ones_like(s) for n, s in scores.items()}
    assert sum(int(m.sum()) for m in masks_from_scores(flat, density).values()) == round(
        density * total
    )


def test_bad_density_and_scope_are_errors():
    scores = magnitude_scores(mlp())
    with pytest.raises(ValueError, match="density"):
        masks_from_scores(scores, 0.0)
    with pytest.raises(ValueError, match="layerwise"):
        masks_from_scores(scores, 0.5, scope="per-layer")


def collapsible_net():
    """The middle layer's weights are 1000x smaller: global magnitude removes all of them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU())
    net.append(nn.Linear(100, 10))
    with torch.no_grad():
        net[2].weight.mul_(1e-3)
    return Classifier(net, 10)


def test_synflow_is_data_free_and_positive():
    model = collapsible_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nan_batches = [{"inputs": torch.full((4, 20), float("nan")), "targets": torch.zeros(4)}]
    real = random_batches(1, rows=4, features=20, classes=10)
    masks_nan = prune_at_init("synflow", model, nan_batches, 0.1, iterations=20)
    masks_real = prune_at_init("synflow", model, real, 0.1, iterations=20)
    assert all(torch.equal(masks_nan[n], masks_real[n]) for n in masks_nan)
    dense = synflow_scores(model, (20,), iterations=20)
    assert all((s > 0).all() for s in dense.values())
    sparse = synflow_scores(model, (20,), iterations=20, density=0.1)
    assert all((s >= 0).all() and (s[masks_real[n]] > 0).all() for n, s in sparse.items())
    again = masks_from_scores(sparse, 0.1)
    assert all(torch.equal(again[n], masks_real[n]) for n in again)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_iterative_synflow_avoids_the_layer_collapse_of_global_magnitude():
    model = collapsible_net()
    weights = prunable_parameters(model)
    magnitude = magnitude_masks(weights, sparsity=0.9, scope="global")
    assert int(magnitude["net.2.weight"].sum()) == 0  # one-shot magnitude disconnects the net
    masks = prune_at_init("synflow", model, None, 0.1, iterations=100, input_shape=(20,))
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * total)
    assert all(int(m.sum()) >= 1 for m in masks.values()), {
        n: int(m.sum()) for n, m in masks.items()
    }


def test_shuffle_keeps_layer_density_and_inversion_takes_the_complement():
    model = mlp(widths=(6, 32, 16, 4))
    scores = snip_scores(model, random_batches(features=6, classes=4))
    masks = masks_from_scores(scores, 0.3)
    shuffled = shuffle_layerwise(masks, torch.Generator().manual_seed(0))
    for name, mask in masks.items():
        assert int(shuffled[name].sum()) == int(mask.sum()), name
        assert shuffled[name].shape == mask.shape
    assert any(not torch.equal(shuffled[n], masks[n]) for n in masks)
    half = masks_from_scores(scores, 0.5)
    inverted = masks_from_scores(invert_scores(scores), 0.5)
    assert all(torch.equal(inverted[n], ~half[n]) for n in half)
    by_magnitude = prune_at_init("magnitude", model, None, 0.5)
    by_inverted = prune_at_init("magnitude", model, None, 0.5, invert=True)
    assert all(torch.equal(by_inverted[n], ~by_magnitude[n]) for n in by_magnitude)


def test_random_pruning_depends_on_the_seed_only():
    model = mlp()
    a, b = (prune_at_init("random", model, None, 0.4, seed=s) for s in (0, 0))
    c = prune_at_init("random", model, None, 0.4, seed=1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_unknown_method_lists_the_methods():
    with pytest.raises(ValueError, match="snip.*grasp.*synflow.*magnitude.*random"):
        prune_at_init("lottery", mlp(), None, 0.5)
    with pytest.raises(ValueError, match="snip.*grasp.*synflow.*magnitude.*random"):
        run_pai(tiny_config(), "unused", "obd", [0.5])


def tiny_config():
    return load_config(
        "quickstart",
        [
            "max_duration=2ba",
            "data.train_samples=256",
            "data.eval_samples=200",
            "data.batch_size=64",
            "model.channels=8",
            "eval_interval=0ba",
            "progress_bar=false",
        ],
    )


def test_reinitialized_weights_are_a_fresh_draw():
    cfg = tiny_config()
    init = initial_weights(cfg)
    same = reinitialized_weights(cfg, cfg.seed)
    other = reinitialized_weights(cfg, cfg.seed + 1)
    assert all(torch.equal(init[k], same[k]) for k in init)
    assert list(other) == list(init)
    assert not torch.equal(other["net.head.weight"], init["net.head.weight"])
    assert cfg.seed == 17  # the caller's config is not modified


def test_run_pai_end_to_end_and_resumes_without_training(tmp_path, monkeypatch):
    cfg = tiny_config()
    rows = {}
    for method in ("snip", "synflow"):
        rows[method] = run_pai(cfg, tmp_path, method, [0.2], iterations=10)
    for method, (row,) in rows.items():
        assert row["method"] == method and row["density"] == 0.2
        assert set(row["accuracy"]) == {"main", "shuffle", "reinit", "invert"}
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
        assert set(row["layer_density"]) == {
            "net.features.0.weight",
            "net.features.2.weight",
            "net.features.4.weight",
            "net.head.weight",
        }
        for check in row["accuracy"]:
            summary = json.loads((tmp_path / f"{method}-d0.2" / check / "summary.json").read_text())
            assert abs(summary["density"] - 0.2) < 1e-3
    main = tmp_path / "snip-d0.2" / "main"
    final = torch.load(main / "final.pt", weights_only=True)
    kept = sum(int((final[n] != 0).sum()) for n in rows["snip"][0]["layer_density"])
    total = sum(final[n].numel() for n in rows["snip"][0]["layer_density"])
    assert abs(kept / total - 0.2) < 1e-3  # the masks were applied during training
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")}
    assert len(mtimes) == 8

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pai, "train_run", no_training)
    monkeypatch.setattr(pai, "initial_weights", no_training)
    assert run_pai(cfg, tmp_path, "snip", [0.2], iterations=10) == rows["snip"]
    assert run_pai(cfg, tmp_path, "synflow", [0.2], iterations=10) == rows["synflow"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")} == mtimes
    assert rows["snip"][0]["scope"] == "global"  # the papers' default
    # The same directory with other settings is refused, not read back.
    with pytest.raises(ConfigError, match=r'scope: "global" there, "layerwise" now'):
        run_pai(cfg, tmp_path, "snip", [0.2], scope="layerwise", iterations=10)
    with pytest.raises(ConfigError, match=r"iterations: 10 there, 20 now"):
        run_pai(cfg, tmp_path, "synflow", [0.2], iterations=20)


def test_synflow_refuses_token_inputs():
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.zeros(2, 5)}
    with pytest.raises(ValueError, match="input_ids"):
        prune_at_init("synflow", mlp(), [batch], 0.5)


def test_cli_pai_takes_the_scope_and_one_experiment_per_seed(tmp_path, capsys):
    out = tmp_path / "pai"
    args = ["lottery", "quickstart", "--smoke", "--pai", "magnitude", "--densities", "0.3"]
    args += ["--scope", "layerwise", "--seeds", "1", "2", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    per_seed = {}
    for seed in (1, 2):
        base = out / f"seed_{seed}" / "magnitude-d0.3"
        final = torch.load(base / "main" / "final.pt", weights_only=True)
        layers = json.loads((base / "layer_density.json").read_text())
        for name, kept in layers.items():  # layerwise: every layer keeps 30% of itself
            numel = final[name].numel()
            assert kept == pytest.approx(round(0.3 * numel) / numel, abs=1e-7)
            assert int((final[name] != 0).sum()) <= round(0.3 * numel)  # held while training
        assert "seed: " + str(seed) in (base / "main" / "config.yaml").read_text()
        per_seed[seed] = {
            run: json.loads((base / run / "summary.json").read_text())["metrics"]["accuracy"]
            for run in ("main", "shuffle", "reinit", "invert")
        }
    first = torch.load(out / "seed_1" / "magnitude-d0.3" / "masks.pt", weights_only=True)
    second = torch.load(out / "seed_2" / "magnitude-d0.3" / "masks.pt", weights_only=True)
    assert any(not torch.equal(first["main"][n], second["main"][n]) for n in first["main"])
    (row,) = json.loads((out / "pai.json").read_text())
    assert row["scope"] == "layerwise" and row["seeds"] == 2
    for run, (a, b) in {r: (per_seed[1][r], per_seed[2][r]) for r in per_seed[1]}.items():
        mean, std = (a + b) / 2, abs(a - b) / 2**0.5  # the sample deviation of two values
        assert row["accuracy"][run] == pytest.approx(mean)
        assert row["accuracy_std"][run] == pytest.approx(std) and row["accuracy_n"][run] == 2
        assert f"{run}={mean:.4f} ± {std:.4f} (n=2)" in printed
