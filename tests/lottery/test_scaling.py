"""The pruning scaling law (Rosenfeld et al. 2021): the form, the fit, held-out prediction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from speedup.lottery.scaling import (
    fit,
    holdout_error,
    predict,
    pruned_error,
    resolve_width_key,
    run_scaling,
    width_keys,
    with_width,
)

from speedup.cli import main
from speedup.config import ConfigError, load_config

# Tiny ops: one intra-op thread is as fast and does not spin on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


TRUE = {"eps_up": 0.9, "gamma": 1.5, "p": 0.02, "psi": 1.0}


def _eps_np(width: float) -> float:
    return 0.04 + 0.2 / width


def _synthetic(widths=(1, 2, 4, 8), noise=0.01, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for w in widths:
        for k in range(0, 31, 2):
            d = 0.8**k
            clean = float(pruned_error(d, _eps_np(w), width=w, **TRUE))
            rows.append({"width": w, "density": d, "error": clean * math.exp(rng.normal(0, noise))})
    return rows


def test_form_has_the_three_regions():
    eps_np, eps_up, gamma, p = 0.05, 0.9, 2.0, 0.01
    dense, sparse = pruned_error(np.array([1.0, 1e-7]), eps_np, eps_up, gamma, p)
    assert dense == pytest.approx(eps_np, rel=1e-2)  # low-error plateau
    assert sparse == pytest.approx(eps_up, rel=1e-6)  # high-error plateau
    # Power-law region, p << d << p (eps_up/eps_np)^(1/gamma) (here 1e-3 << d << 0.095):
    # error = eps_up (p/d)^gamma, slope -gamma in log-log.
    e1, e2 = pruned_error(np.array([0.008, 0.012]), 1e-4, eps_up, gamma, 1e-3)
    slope = math.log(e2 / e1) / math.log(0.012 / 0.008)
    assert slope == pytest.approx(-gamma, abs=0.1)
    assert e1 == pytest.approx(eps_up * (1e-3 / 0.008) ** gamma, rel=0.05)
    # Error is monotone in density, and width shifts the curve by the invariant w^psi d.
    grid = np.geomspace(1e-4, 1, 50)
    curve = pruned_error(grid, eps_np, eps_up, gamma, p)
    assert np.all(np.diff(curve) < 0)
    wide = pruned_error(0.01, eps_np, eps_up, gamma, p, width=4.0, psi=1.0)
    assert float(wide) == pytest.approx(float(pruned_error(0.04, eps_np, eps_up, gamma, p)))


def test_fit_recovers_known_parameters():
    params = fit(_synthetic())
    assert params["gamma"] == pytest.approx(TRUE["gamma"], rel=0.1)
    assert params["p"] == pytest.approx(TRUE["p"], rel=0.15)
    assert params["psi"] == pytest.approx(TRUE["psi"], abs=0.1)
    assert params["eps_up"] == pytest.approx(TRUE["eps_up"], rel=0.05)
    assert params["fit_mean_rel_error"] < 0.02
    assert all(g["measured"] for g in params["eps_np"].values())
    json.dumps(params)  # serialisable as it is
    grid = np.geomspace(1e-3, 1, 7)
    truth = pruned_error(grid, _eps_np(4), width=4, **TRUE)
    assert np.allclose(predict(params, 4, grid), truth, rtol=0.03)
    assert isinstance(predict(params, 4, 0.5), float)


def test_fit_without_dense_rows_fits_eps_np_freely():
    rows = [r for r in _synthetic(noise=0.0) if r["density"] < 1]
    params = fit(rows)
    assert not any(g["measured"] for g in params["eps_np"].values())
    assert params["eps_np"]["8x1"]["value"] == pytest.approx(_eps_np(8), rel=0.05)
    assert params["fit_mean_rel_error"] < 0.01


def test_held_out_width_is_predicted_within_a_few_percent():
    rows = _synthetic()
    result = holdout_error(rows, 8)
    assert result["eps_np_source"] == "measured"
    assert result["n"] == 15  # the pruned rows of width 8
    assert result["mean_rel_error"] < 0.04
    assert result["mean_abs_error"] < 0.01
    assert all(not math.isclose(float(k.split("x")[0]), 8) for k in result["params"]["eps_np"])
    extrapolated = holdout_error(rows, 8, use_dense=False)
    assert extrapolated["eps_np_source"] == "extrapolated" and extrapolated["n"] == 16
    assert math.isfinite(extrapolated["mean_rel_error"])


def test_degenerate_inputs_raise():
    one_width = [r for r in _synthetic() if r["width"] == 2]
    with pytest.raises(ValueError, match="two or more widths"):
        fit(one_width)
    with pytest.raises(ValueError, match="two or more widths"):
        holdout_error(_synthetic(widths=(1, 2)), 2)
    with pytest.raises(ValueError, match="no observation"):
        holdout_error(_synthetic(), 16)
    with pytest.raises(ValueError, match="density"):
        fit([{"width": 1, "density": 1.5, "error": 0.1}] * 4)
    with pytest.raises(ValueError, match="lacks"):
        fit([{"width": 1, "error": 0.1}])


def test_depth_enters_through_the_invariant():
    rng = np.random.default_rng(1)
    rows = []
    for w, depth in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)]:
        eps_np = 0.03 + 0.1 / (w * depth)
        for k in range(0, 31, 3):
            d = 0.8**k
            e = pruned_error(d, eps_np, width=w, depth=depth, phi=0.5, **TRUE)
            rows.append(
                {
                    "width": w,
                    "depth": depth,
                    "density": d,
                    "error": float(e) * (1 + 0.005 * rng.normal()),
                }
            )
    params = fit(rows)
    assert params["phi"] == pytest.approx(0.5, abs=0.1)
    assert params["psi"] == pytest.approx(1.0, abs=0.1)


TINY = [
    "max_duration=20ba",
    "data.train_samples=512",
    "data.eval_samples=300",
    "data.batch_size=64",
    "eval_interval=0ba",
    "log_interval=0ba",
    "optimizer.lr=0.02",
    "device=cpu",
]


def _check_runs(result: dict, out, widths: tuple, densities: tuple) -> None:
    obs = result["observations"]
    assert len(obs) == len(widths) * (len(densities) + 1)
    assert {(o["width"], o["target_density"]) for o in obs} == {
        (float(w), d) for w in widths for d in (1.0, *densities)
    }
    for o in obs:
        assert 0 <= o["error"] <= 1
        assert o["density"] == pytest.approx(o["target_density"], abs=0.01)
    for w in widths:
        for sub in ("dense", *(f"density-{d:g}" for d in densities)):
            assert (out / f"width-{w}" / sub / "summary.json").exists()
    fitted = result["fit"]
    assert all(math.isfinite(fitted[k]) for k in ("eps_up", "gamma", "p", "psi"))
    assert 0 < fitted["eps_up"] < 1 and 0 < fitted["gamma"] < 20


def test_run_scaling_end_to_end(tmp_path):
    cfg = load_config("quickstart", TINY)
    out = tmp_path / "scaling"
    result = run_scaling(cfg, out, widths=[16, 4, 8], densities=[0.2])
    _check_runs(result, out, (4, 8, 16), (0.2,))
    assert set(result["fit"]["eps_np"]) == {"4x1", "8x1"}  # fitted without the largest
    holdout = result["holdout"]
    assert holdout["holdout_width"] == 16.0 and holdout["n"] == 1
    assert holdout["eps_np_source"] == "measured"
    assert math.isfinite(holdout["mean_rel_error"])
    saved = json.loads((out / "scaling.json").read_text())
    assert saved["holdout"]["mean_abs_error"] == pytest.approx(holdout["mean_abs_error"])
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("final.pt")}
    again = run_scaling(cfg, out, widths=[4, 8, 16], densities=[0.2])
    assert again["observations"] == result["observations"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("final.pt")} == mtimes
    with pytest.raises(ValueError, match="two widths"):
        run_scaling(cfg, out, widths=[4], densities=[0.5])
    with pytest.raises(ValueError, match="below 1"):
        run_scaling(cfg, out, widths=[4, 8], densities=[1.0])


def test_run_scaling_iterative_two_widths(tmp_path):
    cfg = load_config("quickstart", [*TINY, "max_duration=40ba"])
    out = tmp_path / "imp"
    result = run_scaling(cfg, out, widths=[4, 8], densities=[0.5, 0.1], iterative=True)
    _check_runs(result, out, (4, 8), (0.5, 0.1))
    assert result["holdout"] is None and set(result["fit"]["eps_np"]) == {"4x1", "8x1"}
    # An IMP chain: the sparser mask lies inside the denser one.
    sparse = torch.load(out / "width-8" / "density-0.1" / "final.pt", weights_only=True)
    denser = torch.load(out / "width-8" / "density-0.5" / "final.pt", weights_only=True)
    for name, w in sparse.items():
        if name.endswith("weight") and w.dim() >= 2:
            assert bool(((w != 0) <= (denser[name] != 0)).all())


def test_width_keys_come_from_the_models_arguments():
    cnn = load_config("quickstart", smoke=True)
    mlp = load_config("mnist1d-lottery-mlp", smoke=True)
    assert width_keys(cnn) == ["model.channels"] and width_keys(mlp) == ["model.widths"]
    assert resolve_width_key(cnn) == "model.channels"
    assert resolve_width_key(mlp) == "model.widths"
    with pytest.raises(ConfigError, match=r"model\.channels: not a width argument of model "):
        resolve_width_key(mlp, "model.channels")
    with pytest.raises(ConfigError, match=r"allowed: model\.widths$"):
        resolve_width_key(mlp, "model.channels")
    assert with_width(cnn, "model.channels", 4).model.channels == 4
    assert list(with_width(mlp, "model.widths", 8).model.widths) == [8, 8]  # from [512, 512]
    lenet = load_config("mnist1d-lottery-mlp", ["model.widths=[300,100]"], smoke=True)
    assert list(with_width(lenet, "model.widths", 30).model.widths) == [30, 10]
    assert list(with_width(lenet, "model.widths", 1).model.widths) == [1, 1]  # never 0 wide
    assert list(lenet.model.widths) == [300, 100]  # the caller's config is left as it was


def test_cli_scaling_runs_the_mlp_recipe_and_checks_the_width_key_first(tmp_path, capsys):
    out = tmp_path / "mlp"
    base = ["lottery", "mnist1d-lottery-mlp", "--smoke", "--scaling", "--widths", "4", "8"]
    bad = main([*base, "--width-key", "model.channels", "--out", str(out)])
    err = capsys.readouterr().err
    assert bad == 2 and "allowed: model.widths" in err and not out.exists()
    assert main([*base, "--densities", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "width key: model.widths" in printed and "fit: eps_up " in printed
    final = torch.load(out / "width-8" / "density-0.5" / "final.pt", weights_only=True)
    assert [tuple(final[f"net.net.{i}.weight"].shape) for i in (1, 3, 5)] == [
        (8, 40),
        (8, 8),
        (10, 8),
    ]
    saved = json.loads((out / "scaling.json").read_text())
    assert saved["width_key"] == "model.widths"
    assert {(o["width"], tuple(o["model_arg"])) for o in saved["observations"]} == {
        (4.0, (4, 4)),
        (8.0, (8, 8)),
    }
    assert f"eps_up {saved['fit']['eps_up']:.4f}, gamma {saved['fit']['gamma']:.4f}" in printed
