"""The pruning scaling law: the error of magnitude-pruned networks across density and width.

Rosenfeld, Frankle, Carbin & Shavit, "On the predictability of pruning across scales"
(ICML 2021, arXiv 2006.10621). Plotted against density d, the test error of IMP-pruned networks
of one family has three regions (their Fig. 1): a *low-error plateau* at the unpruned error
``eps_np`` for dense-enough networks, a *power-law region* where error grows like
``d^-gamma`` as density falls, and a *high-error plateau* ``eps_up`` near chance. Their
Eq. 1 captures the three with one rational envelope in the complex plane (``j = sqrt(-1)``)::

    eps(d) = eps_np * | (d - j p (eps_up / eps_np)^(1/gamma)) / (d - j p) |^gamma

Far above ``p`` the ratio tends to 1 (error ``eps_np``); far below, to
``(eps_up / eps_np)^(1/gamma)`` (error ``eps_up``); in between the error is
``eps_up (p / d)^gamma``, the power law. Across scales (their Section 5) width ``w`` and depth
``l`` enter only through the invariant ``m* = l^phi w^psi d`` that replaces ``d`` in Eq. 1,
with ``eps_np`` the unpruned error of that (l, w): networks with the same ``m*`` and the same
unpruned error have the same pruned error, whatever their density. The shared free parameters
are ``eps_up, gamma, p, psi, phi``.

This module implements exactly that joint form, with the modulus written out
(``|a - j b| = sqrt(a^2 + b^2)`` for real a, b) and evaluated in log space for stability::

    log eps = log eps_np + gamma/2 * [ log(m*^2 + p^2 (eps_up/eps_np)^(2/gamma))
                                       - log(m*^2 + p^2) ]

Simplifications and choices, stated honestly:

* The equation numbers are those of the arXiv/ICML text as recalled (Eq. 1: one network; the
  joint form: Eq. 1 with ``d`` replaced by ``m*``, Section 5); they were not re-checked
  against the PDF in this environment, the behaviour of the form (the three regions and their
  limits) was.
* ``eps_np`` is the measured unpruned error of each (width, depth) when the observations
  contain a dense row (density 1), as in the paper, where it is an input of the form, not a
  free parameter. Groups without a dense row get a free ``eps_np``. For widths never seen,
  ``eps_np`` is extrapolated with a pure power law ``eps_np = a w^-b (l^-c)`` fitted to the
  known groups - a simplification of the dense scaling law of Rosenfeld et al. (ICLR 2020)
  that the paper cites for this purpose (no irreducible-error floor, which three or four
  widths cannot pin down).
* The fit is least squares on log error (relative residuals, as the paper reports relative
  deviations), with torch's L-BFGS from a small grid of starts; ``p`` is optimised in log
  space, ``eps_up`` in (0, 1) and ``gamma`` in (0, 20) through sigmoids (so that a fit to a
  few noisy points stays finite). scipy is not used.
* :func:`run_scaling` prunes one-shot (or, with ``iterative=True``, as an IMP chain through
  the requested densities) with rewinding to initialisation - a cheap stand-in for the paper's
  20%-per-level IMP; the law is about IMP networks, so treat the fit on one-shot data as an
  approximation.
* Width is one model argument (``width_key``): a number of channels or units (conv nets'
  ``channels``, ResNets' ``width``), or a list of hidden widths (an MLP's ``widths``), which is
  scaled as a whole: width ``w`` makes the first hidden layer ``w`` wide and keeps the ratios
  of the others (``[300, 100]`` at 30 is ``[30, 10]``), as the paper scales every layer of a
  family by one factor. The fit only sees ``log w``, so any fixed reference layer would do.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from speedup.config import with_changes
from speedup.errors import ConfigError

__all__ = [
    "fit",
    "holdout_error",
    "pruned_error",
    "predict",
    "resolve_width_key",
    "run_scaling",
    "width_keys",
    "with_width",
]

RESULTS = "scaling.json"
_DENSE = 1.0 - 1e-9
_MIN_ERROR = 1e-6  # errors are fitted in log space; an exact 0 is clipped to this
#: Bounds that keep a fit to few, noisy points finite: ``0 < eps_up < 1`` (an error rate) and
#: ``0 < gamma < GAMMA_MAX`` (through sigmoids); p, psi and phi are unbounded.
GAMMA_MAX = 20.0


def _logit(x: float) -> float:
    x = min(max(x, 1e-6), 1 - 1e-6)
    return math.log(x / (1 - x))


def _log_error(
    log_m: torch.Tensor,
    log_eps_np: torch.Tensor,
    log_eps_up: torch.Tensor,
    gamma: torch.Tensor,
    log_p: torch.Tensor,
) -> torch.Tensor:
    """log of Eq. 1 with ``d`` replaced by the invariant ``m*`` (all inputs in log space)."""
    two_log_m = 2 * log_m
    upper = torch.logaddexp(two_log_m, 2 * log_p + (2 / gamma) * (log_eps_up - log_eps_np))
    lower = torch.logaddexp(two_log_m, 2 * log_p + torch.zeros_like(two_log_m))
    return log_eps_np + gamma / 2 * (upper - lower)


def pruned_error(
    density: float | np.ndarray,
    eps_np: float | np.ndarray,
    eps_up: float,
    gamma: float,
    p: float,
    width: float | np.ndarray = 1.0,
    depth: float | np.ndarray = 1.0,
    psi: float = 0.0,
    phi: float = 0.0,
) -> np.ndarray:
    """Rosenfeld et al.'s functional form: error at ``density`` of a network whose unpruned
    error is ``eps_np``, with invariant ``m* = depth^phi width^psi density`` (module doc)."""
    as64 = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float64))  # noqa: E731
    log_m = phi * torch.log(as64(depth)) + psi * torch.log(as64(width)) + torch.log(as64(density))
    out = _log_error(
        log_m,
        torch.log(as64(eps_np)),
        torch.log(as64(eps_up)),
        as64(gamma),
        torch.log(as64(p)),
    )
    return torch.exp(out).numpy()


# -- observations -----------------------------------------------------------------------------


def _rows(observations: Iterable[dict[str, Any]]) -> list[dict[str, float]]:
    rows = []
    for i, obs in enumerate(observations):
        try:
            row = {
                "width": float(obs["width"]),
                "depth": float(obs.get("depth", 1.0)),
                "density": float(obs["density"]),
                "error": float(obs["error"]),
            }
        except KeyError as exc:
            raise ValueError(
                f"observation {i} lacks {exc.args[0]!r} (width, density, error)"
            ) from None
        if not all(math.isfinite(v) for v in row.values()):
            raise ValueError(f"observation {i} is not finite: {row}")
        if row["width"] <= 0 or row["depth"] <= 0 or not 0 < row["density"] <= 1 + 1e-9:
            raise ValueError(f"observation {i}: width, depth > 0 and density in (0, 1]: {row}")
        if not 0 <= row["error"] <= 1:
            raise ValueError(f"observation {i}: error must be in [0, 1], got {row['error']}")
        rows.append(row)
    return rows


def _group(row: dict[str, float]) -> tuple[float, float]:
    return (row["width"], row["depth"])


def _dense_errors(rows: list[dict[str, float]]) -> dict[tuple[float, float], float]:
    """Measured unpruned error per (width, depth): the mean of its density-1 rows."""
    dense: dict[tuple[float, float], list[float]] = {}
    for row in rows:
        if row["density"] >= _DENSE:
            dense.setdefault(_group(row), []).append(max(row["error"], _MIN_ERROR))
    return {g: sum(v) / len(v) for g, v in dense.items()}


def _key(group: tuple[float, float]) -> str:
    return f"{group[0]:g}x{group[1]:g}"


# -- fitting ----------------------------------------------------------------------------------


def fit(
    observations: Iterable[dict[str, Any]],
    *,
    restarts: int | None = None,
    max_iter: int = 100,
) -> dict[str, Any]:
    """Fit the joint form to rows ``{"width", "density", "error"}`` (optional ``"depth"``).

    Needs at least two different widths (or depths): with one, the exponent of the invariant
    cannot be identified. Returns JSON-serialisable parameters: ``eps_up, gamma, p, psi, phi``,
    ``eps_np`` per group (``"<width>x<depth>"`` -> value, with whether it was measured), the
    power-law extrapolation of ``eps_np`` to unseen widths, the final loss and the fit's mean
    relative error on its own data. ``restarts`` caps the number of starting points tried
    (default: all of a 4 x 4 grid over gamma and p).
    """
    rows = _rows(observations)
    groups = sorted({_group(r) for r in rows})
    widths = sorted({g[0] for g in groups})
    depths = sorted({g[1] for g in groups})
    if len(widths) < 2 and len(depths) < 2:
        raise ValueError(
            f"fit needs observations at two or more widths (or depths), got widths {widths}"
        )
    if len(rows) < 4:
        raise ValueError(f"fit needs at least 4 observations, got {len(rows)}")
    use_psi, use_phi = len(widths) >= 2, len(depths) >= 2
    measured = _dense_errors(rows)
    free_groups = [g for g in groups if g not in measured]
    dtype = torch.float64
    log_w = torch.tensor([math.log(r["width"]) for r in rows], dtype=dtype)
    log_l = torch.tensor([math.log(r["depth"]) for r in rows], dtype=dtype)
    log_d = torch.tensor([math.log(min(r["density"], 1.0)) for r in rows], dtype=dtype)
    target = torch.tensor([math.log(max(r["error"], _MIN_ERROR)) for r in rows], dtype=dtype)
    group_index = torch.tensor([groups.index(_group(r)) for r in rows])
    fixed_np = torch.tensor(
        [math.log(measured.get(g, 1.0)) for g in groups], dtype=dtype
    )  # placeholders for free groups are overwritten below
    free_index = torch.tensor([groups.index(g) for g in free_groups], dtype=torch.long)
    top_error = max(r["error"] for r in rows)
    init_np = []
    for g in free_groups:  # the error at the group's highest density
        best = max((r for r in rows if _group(r) == g), key=lambda r: r["density"])
        init_np.append(math.log(max(best["error"], _MIN_ERROR)))

    def unpack(theta: torch.Tensor) -> dict[str, torch.Tensor]:
        log_np = fixed_np.clone()
        if len(free_groups):
            log_np = log_np.index_put((free_index,), theta[5:])
        return {
            "log_eps_up": torch.nn.functional.logsigmoid(theta[0]),
            "gamma": GAMMA_MAX * torch.sigmoid(theta[1]),
            "log_p": theta[2],
            "psi": theta[3] if use_psi else torch.zeros((), dtype=dtype),
            "phi": theta[4] if use_phi else torch.zeros((), dtype=dtype),
            "log_np": log_np,
        }

    def loss_fn(theta: torch.Tensor) -> torch.Tensor:
        q = unpack(theta)
        log_m = q["phi"] * log_l + q["psi"] * log_w + log_d
        pred = _log_error(log_m, q["log_np"][group_index], q["log_eps_up"], q["gamma"], q["log_p"])
        return ((pred - target) ** 2).mean()

    # Starting points: gamma in {0.5, 1, 2, 4}; p at quantiles of the observed log densities
    # (the transition lies somewhere in the data); eps_up a little above the worst error.
    quantiles = torch.quantile(log_d, torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=dtype))
    starts = list(itertools.product([0.5, 1.0, 2.0, 4.0], quantiles.tolist()))
    if restarts is not None:
        starts = starts[: max(1, restarts)]
    best_theta, best_loss = None, math.inf
    for gamma0, log_p0 in starts:
        theta = torch.tensor(
            [_logit(min(0.99, 1.1 * top_error)), _logit(gamma0 / GAMMA_MAX), log_p0, 1.0, 0.0]
            + init_np,
            dtype=dtype,
            requires_grad=True,
        )
        opt = torch.optim.LBFGS(
            [theta],
            lr=1.0,
            max_iter=max_iter,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-12,
            tolerance_change=1e-11,
        )

        def closure(theta=theta, opt=opt) -> torch.Tensor:
            opt.zero_grad()
            value = loss_fn(theta)
            value.backward()
            return value

        try:
            opt.step(closure)
        except RuntimeError:  # a diverging start; the others decide
            continue
        with torch.no_grad():
            value = float(loss_fn(theta))
        if math.isfinite(value) and value < best_loss and torch.isfinite(theta).all():
            best_theta, best_loss = theta.detach().clone(), value
    if best_theta is None:
        raise RuntimeError("the scaling-law fit diverged from every starting point")
    q = unpack(best_theta)
    log_np = q["log_np"].tolist()
    params: dict[str, Any] = {
        "form": "Rosenfeld et al. 2021, Eq. 1 with the invariant m* = l^phi w^psi d",
        "eps_up": math.exp(float(q["log_eps_up"])),
        "gamma": float(q["gamma"]),
        "p": math.exp(float(q["log_p"])),
        "psi": float(q["psi"]),
        "phi": float(q["phi"]),
        "eps_np": {
            _key(g): {"width": g[0], "depth": g[1], "value": math.exp(v), "measured": g in measured}
            for g, v in zip(groups, log_np)
        },
        "loss": best_loss,
    }
    params["eps_np_law"] = _eps_np_law(groups, log_np, use_phi)
    predicted = [predict(params, r["width"], r["density"], r["depth"]) for r in rows]
    params["fit_mean_rel_error"] = float(
        np.mean(
            [abs(p - r["error"]) / max(r["error"], _MIN_ERROR) for p, r in zip(predicted, rows)]
        )
    )
    return params


def _eps_np_law(
    groups: list[tuple[float, float]], log_np: list[float], use_depth: bool
) -> dict[str, float]:
    """``log eps_np = log_a - b log w (- c log l)`` by least squares over the known groups."""
    columns = [[1.0, -math.log(w)] + ([-math.log(dp)] if use_depth else []) for w, dp in groups]
    design = np.array(columns)
    coef, *_ = np.linalg.lstsq(design, np.array(log_np), rcond=None)
    law = {"log_a": float(coef[0]), "b": float(coef[1])}
    law["c"] = float(coef[2]) if use_depth else 0.0
    return law


def _eps_np_for(params: dict[str, Any], width: float, depth: float) -> float:
    known = params["eps_np"].get(_key((float(width), float(depth))))
    if known is not None:
        return known["value"]
    law = params["eps_np_law"]
    log_np = law["log_a"] - law["b"] * math.log(width) - law["c"] * math.log(depth)
    return min(1.0, math.exp(log_np))


def predict(
    params: dict[str, Any],
    width: float,
    density: float | Sequence[float] | np.ndarray,
    depth: float = 1.0,
    eps_np: float | None = None,
) -> float | np.ndarray:
    """Predicted error at ``density`` (scalar or array) for a network of ``width``/``depth``.

    The unpruned error is ``eps_np`` when given (e.g. the measured error of one dense run of
    a new width: one training instead of a whole IMP sweep), else the fitted one for a known
    width, else the power-law extrapolation across widths (see the module doc).
    """
    unpruned = _eps_np_for(params, width, depth) if eps_np is None else float(eps_np)
    out = pruned_error(
        density,
        unpruned,
        params["eps_up"],
        params["gamma"],
        params["p"],
        width=width,
        depth=depth,
        psi=params["psi"],
        phi=params["phi"],
    )
    return float(out) if np.ndim(density) == 0 else out


def holdout_error(
    observations: Iterable[dict[str, Any]],
    holdout_width: float,
    *,
    use_dense: bool = True,
    **fit_kwargs: Any,
) -> dict[str, Any]:
    """Fit on every width but ``holdout_width`` and predict the held-out width's errors.

    With ``use_dense`` and a dense (density 1) row for the held-out width, its measured
    unpruned error is the form's ``eps_np`` (as in the paper, where ``eps_np`` is an input)
    and the pruned rows are scored; otherwise ``eps_np`` is extrapolated across widths and
    every held-out row is scored. Returns the mean absolute and mean/max relative error, the
    fitted parameters and the per-row predictions.
    """
    rows = _rows(observations)
    held = [r for r in rows if math.isclose(r["width"], holdout_width)]
    train = [r for r in rows if not math.isclose(r["width"], holdout_width)]
    if not held:
        raise ValueError(f"no observation has width {holdout_width}")
    params = fit(train, **fit_kwargs)
    dense = _dense_errors(held) if use_dense else {}
    scored = [r for r in held if r["density"] < _DENSE] if dense else held
    if not scored:
        raise ValueError(f"width {holdout_width} has no pruned observation to predict")
    out_rows = []
    for r in scored:
        eps_np = dense.get(_group(r))
        predicted = predict(params, r["width"], r["density"], r["depth"], eps_np=eps_np)
        out_rows.append({**r, "predicted": predicted})
    abs_err = [abs(r["predicted"] - r["error"]) for r in out_rows]
    rel_err = [a / max(r["error"], _MIN_ERROR) for a, r in zip(abs_err, out_rows)]
    return {
        "holdout_width": float(holdout_width),
        "eps_np_source": "measured" if dense else "extrapolated",
        "n": len(out_rows),
        "mean_abs_error": float(np.mean(abs_err)),
        "mean_rel_error": float(np.mean(rel_err)),
        "max_rel_error": float(np.max(rel_err)),
        "params": params,
        "rows": out_rows,
    }


# -- the experiment ---------------------------------------------------------------------------

#: The width argument chosen when none is given, in this order.
_USUAL_WIDTHS = ("channels", "widths", "width")


def _is_width(value: Any) -> bool:
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if isinstance(value, (list, tuple)):
        return bool(value) and all(count(v) for v in value)
    return count(value)


def width_keys(cfg: DictConfig) -> list[str]:
    """The model's arguments that can be a width: a positive int or a list of them (the
    configured value, else the builder's default), as ``model.<name>``."""
    import inspect

    from omegaconf import OmegaConf

    from speedup.models import MODELS

    builder = MODELS.get(cfg.model.name)
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    keys = []
    for name, param in inspect.signature(builder).parameters.items():
        if name == "info" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = spec.get(name, param.default)
        if _is_width(value):
            keys.append(f"model.{name}")
    return keys


def resolve_width_key(cfg: DictConfig, width_key: str | None = None) -> str:
    """``width_key`` if it is one of :func:`width_keys`, else a ConfigError naming the
    allowed keys; ``None`` picks ``channels``, ``widths`` or ``width``, whichever the model
    has (or its only width argument)."""
    allowed = width_keys(cfg)
    model = cfg.model.name
    if width_key is None:
        usual = [f"model.{n}" for n in _USUAL_WIDTHS if f"model.{n}" in allowed]
        if usual or len(allowed) == 1:
            return (usual or allowed)[0]
        shown = ", ".join(allowed) if allowed else "none (no int or list-of-int argument)"
        raise ConfigError(
            f"--width-key: model {model!r} has no argument named channels, widths or width; "
            f"pass one of its width arguments: {shown}"
        )
    if width_key not in allowed:
        shown = ", ".join(allowed) if allowed else "none (no int or list-of-int argument)"
        raise ConfigError(
            f"--width-key {width_key}: not a width argument of model {model!r}; allowed: {shown}"
        )
    return width_key


def with_width(cfg: DictConfig, width_key: str, width: int) -> DictConfig:
    """``cfg`` with the network ``width`` wide: an int argument is set to it; a list of
    hidden widths is scaled so that its first entry is ``width`` (module doc)."""
    current = OmegaConf.select(cfg, width_key)
    if current is None:  # the builder's default: read it where width_keys found it
        import inspect

        from speedup.models import MODELS

        name = width_key.split(".", 1)[1]
        current = inspect.signature(MODELS.get(cfg.model.name)).parameters[name].default
    value: Any = int(width)
    if isinstance(current, (list, tuple, ListConfig)):
        first = current[0]
        value = [max(1, round(v * width / first)) for v in current]
    return with_changes(cfg, **{width_key: value})


def run_scaling(
    cfg: DictConfig,
    out_dir: str | Path,
    widths: Sequence[float],
    densities: Sequence[float],
    width_key: str | None = None,
    *,
    iterative: bool = False,
    scope: str = "global",
) -> dict[str, Any]:
    """Train pruned networks at each width x density, fit the law, predict the largest width.

    For each width (:func:`with_width` of ``width_key``, by default the model's ``channels``,
    ``widths`` or ``width``; checked before anything trains): one dense run from initialisation
    (``out_dir/width-<w>/dense``), then one run per density below 1
    (``out_dir/width-<w>/density-<d>``) from the *same initial weights* with fixed magnitude
    masks at that density over the conv/linear weights (rewinding to initialisation). One-shot
    by default: masks from the dense run's final weights; ``iterative=True`` makes an IMP
    chain, each density's mask pruning the previous (denser) run's final weights.

    Observations are ``(width, measured density, test error = 1 - accuracy)``. With three or
    more widths the law is fitted on all but the largest and the largest is predicted
    (:func:`holdout_error`, using its dense error); with two, it is fitted on both. Writes and
    returns ``scaling.json``: observations, fit, holdout. Finished runs are never recomputed.
    """
    from speedup.algorithms.magnitude_pruning import magnitude_masks, prunable_parameters
    from speedup.lottery.runs import train_run

    from speedup.run import build_trainer

    widths = sorted({w for w in widths})
    if len(widths) < 2:
        raise ConfigError(f"run_scaling needs at least two widths, got {widths}")
    if any(w < 1 or w != int(w) for w in widths):
        raise ConfigError(f"widths must be whole numbers >= 1, got {widths}")
    levels = sorted({float(d) for d in densities if d < _DENSE}, reverse=True)
    if any(not 0 < d < 1 for d in levels):
        raise ConfigError(f"densities must be in (0, 1], got {list(densities)}")
    if not levels:
        raise ConfigError("run_scaling needs at least one density below 1")
    width_key = resolve_width_key(cfg, width_key)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    observations = []
    for width in widths:
        cfg_w = with_width(cfg, width_key, int(width))
        cfg_w.progress_bar = False
        trainer = build_trainer(cfg_w)  # the initial weights and the prunable names
        model = trainer.state.model
        names = list(prunable_parameters(model))
        initial = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        del trainer, model
        width_dir = out_dir / f"width-{width:g}"
        dense = train_run(cfg_w, width_dir / "dense")
        model_arg = OmegaConf.to_container(cfg_w.model)[width_key.split(".", 1)[1]]
        observations.append(_observation(width, 1.0, dense, model_arg=model_arg))
        source, masks = dense, None
        for density in levels:
            final = source.final_weights
            masks = magnitude_masks(
                {n: final[n] for n in names},
                1.0 - density,
                scope=scope,
                masks=masks if iterative else None,
            )
            run = train_run(cfg_w, width_dir / f"density-{density:g}", weights=initial, masks=masks)
            observations.append(
                _observation(width, float(run["density"]), run, density, model_arg=model_arg)
            )
            if iterative:
                source = run
            else:
                masks = None
    result: dict[str, Any] = {
        "width_key": width_key,
        "widths": [float(w) for w in widths],
        "densities": levels,
        "iterative": iterative,
        "observations": observations,
    }
    if len(widths) >= 3:
        holdout = holdout_error(observations, widths[-1])
        result["fit"] = holdout.pop("params")
        result["holdout"] = holdout
    else:
        result["fit"] = fit(observations)
        result["holdout"] = None
    tmp = out_dir / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out_dir / RESULTS)
    return result


def _observation(
    width: float, density: float, run: dict[str, Any], target: float = 1.0, model_arg: Any = None
) -> dict[str, Any]:
    accuracy = float(run["metrics"]["accuracy"])
    return {
        "width": float(width),
        "model_arg": model_arg,  # what the width key was set to: the list for an MLP
        "density": density,
        "target_density": target,
        "error": 1.0 - accuracy,
        "run_dir": run["run_dir"],
    }
