"""Instability analysis: linear mode connectivity of two copies trained with different SGD noise.

Frankle, Dziugaite, Roy & Carbin, "Linear mode connectivity and the lottery ticket hypothesis"
(ICML 2020). From the weights at step k of training (``W_k``; a rewind point), train two copies
to the end of the schedule with different data orders, giving ``W_T^1`` and ``W_T^2``. Evaluate
the error along the straight line ``(1 - alpha) W_T^1 + alpha W_T^2``; the network is *stable*
at step k when that path has no error barrier. The paper's instability (its Section 2) is the
height of the barrier::

    max_alpha E((1 - alpha) W_T^1 + alpha W_T^2)  -  mean(E(W_T^1), E(W_T^2))

The paper's central finding: IMP finds matching sparse subnetworks exactly when the network
(dense, or sparse with the IMP mask) is stable at the rewind point - at initialisation for
MNIST-scale networks, only after some training for larger ones.

Sparse networks (the paper's Section 5): the IMP subnetwork at rewind point k is ``m ⊙ W_k``,
the mask ``m`` found by IMP with rewinding to k applied to the weights at step k of *dense*
training (its Algorithm 2: the rewind point is taken before any pruning). So with ``masks``
the training up to k stays dense, and both copies train sparse from ``m ⊙ W_k``. Pass the
masks of an IMP experiment run with the same rewind point (``level_N/masks.pt`` of
``speedup lottery --rewind k``) to ask the paper's question: is this ticket stable from k?

The paper reports each curve as the mean and spread over replicates (different
initialisations); :func:`average_seeds` summarises one experiment per seed.

:func:`run_instability` runs the whole experiment; every training run goes through
:func:`speedup.lottery.runs.train_run` in its own directory and every path evaluation is cached
in a json file, so an interrupted experiment resumes and a finished one recomputes nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from speedup.lottery.runs import train_run

from speedup.config import with_changes
from speedup.errors import ConfigError
from speedup.time import Time

__all__ = [
    "average_seeds",
    "check_masks",
    "error_barrier",
    "evaluate_path",
    "interpolate_weights",
    "plot_instability",
    "run_instability",
]

RESULTS = "instability.json"
PATH_CACHE = "path.json"


def interpolate_weights(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """The state dict ``(1 - alpha) * a + alpha * b``.

    Floating-point tensors are interpolated with :func:`torch.lerp`, which returns ``a`` exactly
    at ``alpha = 0`` and ``b`` exactly at ``alpha = 1``. Other tensors (integer buffers such as
    BatchNorm's ``num_batches_tracked``, bool masks) cannot be interpolated and are taken from
    ``a``. Both dicts must have the same keys and shapes.
    """
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"state dicts differ in keys: only in a {only_a}, only in b {only_b}")
    out = {}
    for name, ta in a.items():
        tb = b[name]
        if ta.shape != tb.shape:
            raise ValueError(f"{name}: shapes differ, {tuple(ta.shape)} vs {tuple(tb.shape)}")
        if ta.is_floating_point():
            out[name] = torch.lerp(ta, tb.to(device=ta.device, dtype=ta.dtype), float(alpha))
        else:
            out[name] = ta.clone()
    return out


def error_barrier(rows: Sequence[dict[str, float]]) -> float:
    """Instability: the highest error along the path minus the mean error of its two endpoints
    (Frankle et al. 2020, Section 2). The endpoints are the rows with the smallest and largest
    ``alpha``; 0 for a flat path, negative if the middle is better than both ends."""
    if len(rows) < 2:
        raise ValueError("error_barrier needs at least the two endpoints of the path")
    ordered = sorted(rows, key=lambda r: r["alpha"])
    ends = (ordered[0]["error"] + ordered[-1]["error"]) / 2
    return max(r["error"] for r in ordered) - ends


def _bn_modules(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def _reset_bn(trainer: Any, batches: int) -> None:
    """Re-estimate BatchNorm running statistics from ``batches`` training batches (train mode,
    no gradient, cumulative average: ``momentum=None``)."""
    model = trainer.state.model
    norms = _bn_modules(model)
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    loader = trainer.state.train_dataloader
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        model(trainer._to_device(batch))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def evaluate_path(
    cfg: DictConfig,
    weights_a: dict[str, torch.Tensor],
    weights_b: dict[str, torch.Tensor],
    points: int = 11,
    masks: dict[str, torch.Tensor] | None = None,
    reset_bn: bool = False,
    bn_batches: int = 10,
) -> list[dict[str, float]]:
    """Evaluation metrics at ``points`` evenly spaced ``alpha`` in [0, 1] on the line from
    ``weights_a`` (alpha 0) to ``weights_b`` (alpha 1).

    The model and eval loader come from ``cfg`` (:func:`speedup.run.build_trainer`); each
    interpolated state is loaded and evaluated with ``trainer.eval()``. ``masks`` (parameter
    name -> bool) zero the pruned weights of every interpolated state (a no-op when both ends
    share the mask, as the copies of a sparse network do).

    BatchNorm: the running statistics of an interpolated network are not the statistics of its
    own activations, only the interpolation of the endpoints' statistics. By default they are
    used as they are: the interpolated network is evaluated as is, which is how we read
    Frankle et al. (2020) (not re-checked against the paper's text here). With
    ``reset_bn=True`` they are re-estimated for every alpha from ``bn_batches`` training
    batches in train mode without gradients (which usually lowers the barrier of BN networks).
    Models without BatchNorm are unaffected.

    Returns one row per alpha: ``{"alpha", "accuracy", "error", "loss"}`` with
    ``error = 1 - accuracy``.
    """
    from speedup.run import build_trainer

    if points < 2:
        raise ValueError(f"points must be >= 2 (the two endpoints), got {points}")
    trainer = build_trainer(with_changes(cfg, progress_bar=False))
    model = trainer.state.model
    device = trainer.state.device
    rows = []
    for i in range(points):
        alpha = i / (points - 1)
        state = interpolate_weights(weights_a, weights_b, alpha)
        if masks:
            for name, mask in masks.items():
                state[name] = state[name] * mask.to(state[name].dtype)
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
        if reset_bn:
            _reset_bn(trainer, bn_batches)
        metrics = trainer.eval()
        if "accuracy" not in metrics:
            raise ValueError(
                f"evaluate_path needs an accuracy metric; the model reports {sorted(metrics)}"
            )
        accuracy = float(metrics["accuracy"])
        rows.append(
            {
                "alpha": alpha,
                "accuracy": accuracy,
                "error": 1.0 - accuracy,
                "loss": float(metrics.get("loss", math.nan)),
            }
        )
    return rows


def _fingerprint(weights: dict[str, torch.Tensor]) -> float:
    """A cheap checksum of a state dict (sum of |x| over floating tensors)."""
    total = sum(float(v.double().abs().sum()) for v in weights.values() if v.is_floating_point())
    return round(total, 6)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def run_instability(
    cfg: DictConfig,
    out_dir: str | Path,
    rewind_points: Iterable[str] = ("0ba",),
    points: int = 11,
    data_seeds: Sequence[int] = (1, 2),
    masks: dict[str, torch.Tensor] | None = None,
    reset_bn: bool = False,
) -> list[dict[str, Any]]:
    """Instability of ``cfg``'s network at each rewind point (Frankle et al. 2020, Fig. 1/3).

    For each rewind point k (a Time string such as ``"0ba"``, ``"500ba"``, ``"2ep"``, converted
    to steps by the trainer's converter):

    1. train from initialisation to step k under ``out_dir/pretrain-<k>ba`` (same seed and data
       order as the full run; k = 0 uses the initial weights themselves);
    2. from those weights, at step k of the schedule, train one copy per ``data_seeds`` entry to
       the end (``out_dir/rewind-<k>ba/seed-<s>``), differing only in data order;
    3. evaluate the linear path between the two final weights at ``points`` alphas, cached in
       ``out_dir/rewind-<k>ba/path.json``.

    ``masks`` (parameter name -> bool, checked against the model before anything trains) makes
    both copies sparse from ``masks ⊙ W_k``, ``W_k`` from dense training (module doc: the
    paper's instability of IMP subnetworks); their directories are
    ``out_dir/rewind-<k>ba/sparse-seed-<s>``. Returns per rewind point ``{"rewind": k
    (steps), "rewind_time": the string, "barrier", "path": rows, "endpoint_accuracy":
    [acc(alpha=0), acc(alpha=1)]}`` and writes the list to ``out_dir/instability.json``.
    Finished runs and paths are never recomputed. Bad seeds, rewind points or masks raise
    :class:`~speedup.config.ConfigError` before anything trains.
    """
    from speedup.run import build_trainer

    seeds = list(data_seeds)
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise ConfigError(f"data_seeds must be two different seeds, got {seeds}")
    out_dir = Path(out_dir)
    trainer = build_trainer(
        with_changes(cfg, progress_bar=False)
    )  # the converter and the initial weights, once
    converter = trainer.converter
    total = converter.to_batches(converter.max_duration)
    initial = {k: v.detach().cpu().clone() for k, v in trainer.state.model.state_dict().items()}
    if masks is not None:
        masks = check_masks(masks, trainer.state.model)
    del trainer
    steps = []
    for point in rewind_points:  # all checked before the first one trains
        try:
            k = round(converter.to_batches(Time.parse(point)))
        except ValueError as err:
            raise ConfigError(f"rewind point {point!r}: {err}") from None
        if not 0 <= k < total:
            raise ConfigError(f"rewind point {point} = step {k} is outside the run (0..{total:g})")
        steps.append((point, k))
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_name = "sparse-seed" if masks is not None else "seed"
    results = []
    for point, k in steps:
        if k == 0:
            start = initial
        else:  # dense up to the rewind point, also for a sparse network (module doc)
            start = train_run(cfg, out_dir / f"pretrain-{k}ba", stop_at_batch=k).final_weights
        rewind_dir = out_dir / f"rewind-{k}ba"
        finals = [
            train_run(
                cfg,
                rewind_dir / f"{copy_name}-{s}",
                weights=start,
                masks=masks,
                start_batch=k,
                data_seed=s,
            ).final_weights
            for s in seeds
        ]
        cache = rewind_dir / (PATH_CACHE if masks is None else f"sparse-{PATH_CACHE}")
        key = {
            "points": points,
            "seeds": seeds,
            "reset_bn": reset_bn,
            "weights": [_fingerprint(w) for w in finals],  # stale if a copy was retrained
        }
        cached = json.loads(cache.read_text()) if cache.exists() else None
        if cached is not None and cached.get("key") == key:
            rows = cached["path"]
        else:
            rows = evaluate_path(cfg, finals[0], finals[1], points, masks, reset_bn=reset_bn)
            _write_json(cache, {"key": key, "path": rows})
        results.append(
            {
                "rewind": k,
                "rewind_time": str(point),
                "barrier": error_barrier(rows),
                "path": rows,
                "endpoint_accuracy": [rows[0]["accuracy"], rows[-1]["accuracy"]],
            }
        )
    _write_json(out_dir / RESULTS, results)
    return results


def check_masks(masks: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``masks`` as bool tensors, if every name is a prunable weight of ``model`` with its
    shape; else a ConfigError naming the offending entries and the allowed names."""
    from speedup.algorithms.magnitude_pruning import prunable_parameters

    allowed = {n: tuple(w.shape) for n, w in prunable_parameters(model).items()}
    unknown = sorted(set(masks) - set(allowed))
    if unknown:
        raise ConfigError(
            f"masks: {', '.join(unknown)} not prunable weights of this model; "
            f"allowed: {', '.join(allowed)}"
        )
    wrong = [
        f"{n} {tuple(m.shape)} (the weight is {allowed[n]})"
        for n, m in masks.items()
        if tuple(m.shape) != allowed[n]
    ]
    if wrong:
        raise ConfigError(f"masks: shapes differ from the model's: {'; '.join(wrong)}")
    if not masks:
        raise ConfigError("masks: the file holds no masks")
    return {n: m.bool().cpu() for n, m in masks.items()}


def average_seeds(per_seed: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One result per rewind point over replicates (one :func:`run_instability` per seed):
    the mean barrier, its sample standard deviation (``barrier_std``, None with one seed), ``n``,
    and the mean error at each alpha as ``path`` (for :func:`plot_instability`)."""
    from speedup.lottery.report import mean_spread

    averaged = []
    for same in zip(*per_seed, strict=True):
        barrier, std, n = mean_spread([r["barrier"] for r in same])
        path = []
        for points in zip(*(r["path"] for r in same), strict=True):
            error = sum(p["error"] for p in points) / len(points)
            path.append({"alpha": points[0]["alpha"], "error": error, "accuracy": 1.0 - error})
        averaged.append(
            {
                "rewind": same[0]["rewind"],
                "rewind_time": same[0].get("rewind_time"),
                "barrier": barrier,
                "barrier_std": std,
                "n": n,
                "barriers": [r["barrier"] for r in same],
                "path": path,
            }
        )
    return averaged


def plot_instability(results: Sequence[dict[str, Any]], path_png: str | Path) -> Path:
    """Test error along the interpolation path, one curve per rewind point (the paper's Fig. 2
    style); writes a PNG with matplotlib's Agg canvas (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for result in results:
        rows = result["path"]
        label = f"rewind {result.get('rewind_time', result['rewind'])}"
        label += f" (barrier {100 * result['barrier']:.1f} pp)"
        ax.plot(
            [r["alpha"] for r in rows], [100 * r["error"] for r in rows], marker="o", label=label
        )
    ax.set_xlabel("interpolation alpha")
    ax.set_ylabel("test error (%)")
    ax.set_title("Linear mode connectivity (instability analysis)")
    ax.grid(True, alpha=0.3)
    if results:
        ax.legend()
    fig.tight_layout()
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path_png)
    return path_png
