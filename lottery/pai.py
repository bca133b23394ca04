"""Pruning at initialisation (PaI): score every prunable weight before training, keep the top
``density`` fraction, train the sparse net, and run the sanity checks that ask what the scores
really contribute.

Scores are one float tensor per prunable weight (conv/linear weights, as
:func:`speedup.algorithms.magnitude_pruning.prunable_parameters` selects them), same shape,
**higher = keep**:

* :func:`snip_scores` — SNIP, Lee, Ajanthan & Torr, ICLR 2019 ("SNIP: single-shot network
  pruning based on connection sensitivity"), eq. 6: ``|g * w|`` of the loss on a few batches.
* :func:`grasp_scores` — GraSP, Wang, Zhang & Grosse, ICLR 2020 ("Picking winning tickets
  before training by preserving gradient flow"), eq. 8: ``S(-w) = -w * (H g)``; the paper
  removes the weights with the *highest* ``S``, so the keep-score returned is ``w * (H g)``.
* :func:`synflow_scores` — SynFlow, Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020 ("Pruning
  neural networks without any data by iteratively conserving synaptic flow"), Algorithm 1:
  data-free and iterative, density ``rho^(k/n)`` after round ``k`` of ``n``.
* :func:`magnitude_scores` (``|w|`` at init) and :func:`random_scores`, the baselines.

Sanity checks of Frankle, Dziugaite, Roy & Carbin, ICLR 2021 ("Pruning neural networks at
initialization: why are we missing the mark?", section 5): :func:`shuffle_layerwise` (random
masks with each layer's density), :func:`reinitialized_weights` (same masks, fresh weights) and
:func:`invert_scores` (prune the highest-scoring weights instead). Their finding: SNIP, GraSP,
SynFlow and magnitude-at-init lose nothing to shuffling or reinitialisation (only the per-layer
densities matter), and GraSP loses nothing to inversion.

:func:`run_pai` runs a method at several densities with its checks, one
:func:`speedup.lottery.runs.train_run` each; finished runs are read back, not retrained, and
a density directory made with other settings is refused, not read back.
:func:`average_seeds` summarises one experiment per seed (``speedup lottery --pai --seeds``).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from speedup.algorithms.magnitude_pruning import prunable_parameters
from speedup.lottery.runs import (
    check_inputs,
    config_items,
    initial_weights,
    load_result,
    tensors_digest,
    train_run,
)
from torch import nn

from speedup.config import with_changes
from speedup.errors import ConfigError

__all__ = [
    "CHECKS",
    "METHODS",
    "average_seeds",
    "grasp_scores",
    "invert_scores",
    "magnitude_scores",
    "masks_from_scores",
    "prune_at_init",
    "random_scores",
    "reinitialized_weights",
    "run_pai",
    "shuffle_layerwise",
    "snip_scores",
    "synflow_scores",
]

METHODS = ("snip", "grasp", "synflow", "magnitude", "random")
CHECKS = ("shuffle", "reinit", "invert")
SCOPES = ("global", "layerwise")
LAYER_DENSITY = "layer_density.json"  # per density: fraction of each layer the masks keep
MASKS = "masks.pt"  # per density: the method's masks (and the inverted ones), for a resume

Batch = dict[str, torch.Tensor]
Tensors = dict[str, torch.Tensor]


# -- helpers --------------------------------------------------------------------------------


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run scoring passes without leaving a trace: BatchNorm running statistics, the
    train/eval flags and any ``.grad`` come back as they were."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.grad for p in model.parameters()}
    try:
        yield
    finally:
        model.load_state_dict(saved)
        for module, training in modes.items():
            module.training = training
        for p, grad in grads.items():
            p.grad = grad


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits"):
        return outputs.logits
    raise TypeError(f"cannot find a tensor in model outputs of type {type(outputs).__name__}")


def _mean_loss_grad(
    model: nn.Module, weights: Tensors, batches: Sequence[Batch], create_graph: bool = False
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yields, per batch, the gradient of its loss w.r.t. ``weights`` divided by the number of
    batches (so the sum over batches is the gradient of the mean loss)."""
    if not batches:
        raise ValueError("data-dependent scores need at least one batch")
    for batch in batches:
        loss = model.loss(model(batch), batch) / len(batches)
        yield torch.autograd.grad(
            loss, list(weights.values()), create_graph=create_graph, materialize_grads=True
        )


def _summed(per_batch: Iterable[Sequence[torch.Tensor]], weights: Tensors) -> list[torch.Tensor]:
    """Per weight, the sum over batches of ``per_batch``'s tensors (one per weight each),
    accumulated in place so that only one batch's graph is alive at a time."""
    totals = [torch.zeros_like(w) for w in weights.values()]
    for parts in per_batch:
        for total, part in zip(totals, parts, strict=True):
            total += part
    return totals


def _check_scores(scores: Tensors, method: str) -> Tensors:
    for name, score in scores.items():
        if not torch.isfinite(score).all():
            raise ValueError(f"{method} scores of {name} are not finite (NaN/inf in the loss?)")
    return scores


# -- scores ---------------------------------------------------------------------------------


def snip_scores(model: nn.Module, batches: Sequence[Batch]) -> Tensors:
    """SNIP connection sensitivity ``|dL/dw * w|`` (Lee et al., ICLR 2019, eq. 6: the
    derivative of the loss w.r.t. a multiplicative mask at 1), with ``L`` the mean loss over
    ``batches``. The paper's normalisation by the sum does not change the ranking; dropped."""
    weights = prunable_parameters(model)
    with _untouched(model):
        model.train()
        grads = _summed(_mean_loss_grad(model, weights, batches), weights)
    scores = {n: (g * w).detach().abs() for (n, w), g in zip(weights.items(), grads, strict=True)}
    return _check_scores(scores, "snip")


def grasp_scores(model: nn.Module, batches: Sequence[Batch]) -> Tensors:
    """GraSP keep-scores ``w * (H g)`` (Wang et al., ICLR 2020).

    ``g`` is the gradient of the mean loss over ``batches`` w.r.t. the prunable weights and
    ``H`` its Hessian (the weight-weight block), ``H g`` computed by double backprop: the
    gradient of ``g_fixed . grad L``. The paper scores ``S(-w) = -w * (H g)`` (eq. 8), the
    first-order change of the gradient norm when ``w`` is removed (up to a factor 2), and
    removes the weights with the highest ``S``: removing them reduces gradient flow least (or
    increases it). With this module's convention (higher = keep) the score is therefore
    ``-S = w * (H g)``; :func:`invert_scores` of it gives the paper's ``S``. The reference
    code's softmax temperature (200) is not applied.
    """
    weights = prunable_parameters(model)
    with _untouched(model):
        model.train()
        g = _summed(_mean_loss_grad(model, weights, batches), weights)
        per_batch_hg = (
            torch.autograd.grad(
                sum((gb * gf).sum() for gb, gf in zip(batch_grads, g, strict=True)),
                list(weights.values()),
                materialize_grads=True,
            )
            for batch_grads in _mean_loss_grad(model, weights, batches, create_graph=True)
        )
        hg = _summed(per_batch_hg, weights)
    scores = {n: (w * h).detach() for (n, w), h in zip(weights.items(), hg, strict=True)}
    return _check_scores(scores, "grasp")


def magnitude_scores(model: nn.Module) -> Tensors:
    """``|w|`` at initialisation: the magnitude-at-init baseline of Frankle et al. (2021)."""
    return {n: w.detach().abs().clone() for n, w in prunable_parameters(model).items()}


def random_scores(model: nn.Module, generator: torch.Generator | None = None) -> Tensors:
    """Uniform random scores: random pruning, the floor every method must beat."""
    return {
        n: torch.rand(w.shape, generator=generator).to(w.device)
        for n, w in prunable_parameters(model).items()
    }


def synflow_scores(
    model: nn.Module,
    input_shape: Sequence[int],
    iterations: int = 100,
    density: float = 1.0,
    scope: str = "global",
) -> Tensors:
    """SynFlow scores after iterative pruning to ``density`` (Tanaka et al., NeurIPS 2020).

    Data-free: only ``input_shape`` (one sample, without the batch dimension) is used. On a
    float64 copy of the model in eval mode (BatchNorm uses its running statistics, as in the
    paper's code) every parameter and buffer is replaced by its absolute value, so the net is
    linear in each weight along positive paths; the input is all ones and ``R`` the sum of the
    outputs (the "synaptic flow", eq. 2). Each of ``iterations`` rounds scores
    ``|dR/dw * w|`` on the current sparse net and keeps the top ``density^(k/iterations)``
    fraction (Algorithm 1's exponential schedule), which avoids the layer collapse of one-shot
    pruning. Returned: the last round's scores divided by their maximum (float64 flows of deep
    nets overflow float32), positive on the surviving weights and exactly 0 on the pruned
    ones, so :func:`masks_from_scores` at the same ``density`` and ``scope`` gives the
    iterative masks. With ``density=1`` nothing is pruned (one round's scores).
    """
    scores, _ = _synflow(model, input_shape, iterations, density, scope, invert=False)
    return scores


def _synflow(
    model: nn.Module,
    input_shape: Sequence[int],
    iterations: int,
    density: float,
    scope: str,
    invert: bool,
) -> tuple[Tensors, Tensors]:
    _check_density(density, scope)
    if iterations < 1:
        raise ValueError(f"synflow needs iterations >= 1, got {iterations}")
    names = list(prunable_parameters(model))
    linear = copy.deepcopy(model).double().eval()  # the caller's model is never touched
    with torch.no_grad():
        for tensor in linear.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
    weights = prunable_parameters(linear)
    device = next(iter(weights.values())).device
    ones = {"inputs": torch.ones(1, *input_shape, dtype=torch.float64, device=device)}
    originals = {n: w.detach().clone() for n, w in weights.items()}
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    rounds = iterations if density < 1.0 else 1
    for k in range(1, rounds + 1):
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(originals[n] * masks[n])
        flow = _logits(linear(ones)).sum()
        grads = torch.autograd.grad(flow, [weights[n] for n in names])
        scores = {n: (g * weights[n]).detach().abs() for n, g in zip(names, grads, strict=True)}
        if density < 1.0:
            # Pruned weights rank below every live one, whatever the direction of selection.
            ranked = {n: -s if invert else s for n, s in scores.items()}
            ranked = {n: torch.where(masks[n], r, -torch.inf) for n, r in ranked.items()}
            masks = masks_from_scores(ranked, density ** (k / rounds), scope)
    # Deep nets' flows overflow float32: scale by the largest score (ranking unchanged).
    top = max(float(s.max()) for s in scores.values()) or 1.0
    scores = {n: torch.where(masks[n], s / top, 0.0).float() for n, s in scores.items()}
    return _check_scores(scores, "synflow"), masks


# -- masks ----------------------------------------------------------------------------------


def _check_density(density: float, scope: str) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[scores.flatten().topk(keep, sorted=False).indices] = True
    return mask.view_as(scores)


def masks_from_scores(scores: Tensors, density: float, scope: str = "global") -> Tensors:
    """Bool masks (True = keep) of the ``round(density * n)`` highest scores: over all tensors
    together (``global``) or in each tensor (``layerwise``). Ties are broken arbitrarily, so
    the count is exact."""
    _check_density(density, scope)
    if scope == "layerwise":
        return {n: _top(s, round(density * s.numel())) for n, s in scores.items()}
    flat = torch.cat([s.detach().flatten() for s in scores.values()])  # promotes dtypes
    keep = _top(flat, round(density * flat.numel()))
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].view_as(s)
        offset += s.numel()
    return masks


def prune_at_init(
    method: str,
    model: nn.Module,
    batches: Sequence[Batch] | None,
    density: float,
    scope: str = "global",
    iterations: int = 100,
    seed: int = 0,
    *,
    invert: bool = False,
    input_shape: Sequence[int] | None = None,
) -> Tensors:
    """Masks keeping ``density`` of the prunable weights of ``model`` by ``method``'s scores.

    ``invert`` prunes the highest-scoring weights instead (the inversion check); for SynFlow it
    inverts every round of the iteration. SynFlow reads only the input shape, from
    ``input_shape`` or else ``batches[0]["inputs"]``; ``seed`` seeds the random scores.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning-at-init method {method!r}; choose one of {METHODS}")
    _check_density(density, scope)
    if method == "synflow":
        if input_shape is None:
            if not batches:
                raise ValueError("synflow needs input_shape or one batch to read it from")
            inputs = batches[0].get("inputs")
            if inputs is None or not inputs.is_floating_point():
                raise ValueError(
                    "synflow feeds an all-ones float batch['inputs']; this model's batches have "
                    f"keys {sorted(batches[0])} (token ids cannot be linearised)"
                )
            input_shape = tuple(inputs.shape[1:])
        return _synflow(model, input_shape, iterations, density, scope, invert)[1]
    if method == "snip":
        scores = snip_scores(model, batches or [])
    elif method == "grasp":
        scores = grasp_scores(model, batches or [])
    elif method == "magnitude":
        scores = magnitude_scores(model)
    else:
        scores = random_scores(model, torch.Generator().manual_seed(seed))
    return masks_from_scores(invert_scores(scores) if invert else scores, density, scope)


# -- sanity checks (Frankle et al., ICLR 2021) ----------------------------------------------


def shuffle_layerwise(masks: Tensors, generator: torch.Generator | None = None) -> Tensors:
    """Each mask's entries randomly permuted within its tensor: the same per-layer density,
    a random choice of which weights."""
    out = {}
    for name, mask in masks.items():
        order = torch.randperm(mask.numel(), generator=generator).to(mask.device)
        out[name] = mask.flatten()[order].view_as(mask)
    return out


def invert_scores(scores: Tensors) -> Tensors:
    """Negated scores: keeping the top of these prunes the highest-scoring weights."""
    return {n: -s for n, s in scores.items()}


def reinitialized_weights(cfg: DictConfig, seed: int) -> Tensors:
    """The initial weights ``cfg``'s model would have with ``seed``: the reinitialisation check
    keeps the masks and draws the surviving weights afresh from the same distribution."""
    return initial_weights(with_changes(cfg, seed=seed))


# -- the experiment -------------------------------------------------------------------------


def _train_batches(trainer: Any, count: int) -> list[Batch]:
    loader = trainer.state.train_dataloader
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    device = trainer.state.device
    batches = []
    for batch in loader:
        batches.append({k: v.to(device) for k, v in batch.items()})
        if len(batches) == count:
            break
    return batches


def run_pai(
    cfg: DictConfig,
    out_dir: str | Path,
    method: str,
    densities: Sequence[float],
    checks: Sequence[str] = CHECKS,
    scope: str = "global",
    batches: Sequence[Batch] | None = None,
    seed: int = 0,
    *,
    iterations: int = 100,
    num_batches: int = 4,
) -> list[dict[str, Any]]:
    """Prune ``cfg``'s initial model with ``method`` at each density, train it, and train one
    run per sanity check; returns ``{"method", "density", "scope", "accuracy": {"main",
    <check>...}, "layer_density": {name: fraction kept}}`` per density (final eval accuracy,
    ``None`` for a model without one).

    ``scope`` ranks the scores over all layers together (``global``, as SNIP, GraSP and SynFlow
    do in their papers) or keeps ``density`` of each layer (``layerwise``). Runs land in
    ``out_dir/<method>-d<density>/{main,shuffle,reinit,invert}``. The scores use ``batches``,
    or else the first ``num_batches`` batches of the config's train loader. The
    reinitialisation check draws weights with seed ``cfg.seed + 1``; ``seed`` seeds random
    scores and the shuffles. Each density's directory also holds ``layer_density.json``, the
    masks and ``inputs.json`` (the settings and config the runs were made with); a density
    whose runs are all finished is read back without scoring or training, and one made with
    other settings raises :class:`~speedup.config.ConfigError` naming them.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown pruning-at-init method {method!r}; choose one of {METHODS}")
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ConfigError(f"unknown sanity checks {unknown}; choose from {CHECKS}")
    for density in densities:
        try:
            _check_density(density, scope)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    out_dir = Path(out_dir)
    context: dict[str, Any] = {}

    def setup() -> dict[str, Any]:  # built only if some run still has to train
        if not context:
            from speedup.run import build_trainer

            init = initial_weights(cfg)
            trainer = build_trainer(with_changes(cfg, progress_bar=False))
            model = trainer.state.model
            model.load_state_dict({k: v.to(trainer.state.device) for k, v in init.items()})
            context.update(init=init, model=model)
            context["batches"] = (
                list(batches) if batches is not None else _train_batches(trainer, num_batches)
            )
        return context

    identity = {"method": method, "scope": scope, "seed": seed, **config_items(cfg)}
    if method in ("snip", "grasp"):  # the scores read data
        given = batches or []
        identity["batches"] = (
            num_batches
            if batches is None
            else tensors_digest({f"{i}.{k}": v for i, b in enumerate(given) for k, v in b.items()})
        )
    if method == "synflow":
        identity["iterations"] = iterations
    rows = []
    for density in densities:
        base = out_dir / f"{method}-d{density}"
        check_inputs(base / "inputs.json", {**identity, "density": density}, "a pruning run")
        results = {name: load_result(base / name) for name in ["main", *checks]}
        layers = base / LAYER_DENSITY
        if any(r is None for r in results.values()) or not layers.exists():
            ctx = setup()
            # Masks are scored once and kept: a resumed density trains its remaining checks
            # with the masks its finished runs used (scores on a GPU need not repeat bit for
            # bit, and a tie broken the other way would be another experiment).
            found = torch.load(base / MASKS, weights_only=True) if (base / MASKS).exists() else {}
            masks = found.get("main")
            if masks is None:
                masks = _masks(method, ctx, density, scope, iterations, seed, invert=False)
            inverted = found.get("invert")
            if inverted is None and "invert" in checks:
                inverted = _masks(method, ctx, density, scope, iterations, seed, invert=True)
            base.mkdir(parents=True, exist_ok=True)
            kept = {"main": masks, **({"invert": inverted} if inverted is not None else {})}
            torch.save(kept, base / MASKS)
            density_by_layer = {n: float(m.float().mean()) for n, m in masks.items()}
            layers.write_text(json.dumps(density_by_layer, indent=2) + "\n")
            init = ctx["init"]
            results["main"] = train_run(cfg, base / "main", weights=init, masks=masks)
            for check in checks:
                if check == "shuffle":
                    generator = torch.Generator().manual_seed(seed)
                    run = dict(weights=init, masks=shuffle_layerwise(masks, generator))
                elif check == "reinit":
                    run = dict(weights=reinitialized_weights(cfg, cfg.seed + 1), masks=masks)
                else:
                    run = dict(weights=init, masks=inverted)
                results[check] = train_run(cfg, base / check, **run)
        rows.append(
            {
                "method": method,
                "density": density,
                "scope": scope,
                "accuracy": {n: r["metrics"].get("accuracy") for n, r in results.items()},
                "layer_density": json.loads(layers.read_text()),
            }
        )
    return rows


def average_seeds(per_seed: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (method, density) over the seeds' :func:`run_pai` rows: the mean accuracy
    of the main run and of each check, its sample standard deviation (``accuracy_std``, None
    with one seed) and ``n``."""
    from speedup.lottery.report import mean_spread

    rows = []
    for same in zip(*per_seed, strict=True):
        first = same[0]
        accuracy, spread, counts = {}, {}, {}
        for name in first["accuracy"]:
            values = [r["accuracy"][name] for r in same if r["accuracy"].get(name) is not None]
            accuracy[name], spread[name], counts[name] = mean_spread(values)
        rows.append(
            {
                "method": first["method"],
                "density": first["density"],
                "scope": first.get("scope"),
                "accuracy": accuracy,
                "accuracy_std": spread,
                "accuracy_n": counts,
                "seeds": len(same),
            }
        )
    return rows


def _masks(
    method: str,
    ctx: dict[str, Any],
    density: float,
    scope: str,
    iterations: int,
    seed: int,
    invert: bool,
) -> Tensors:
    masks = prune_at_init(
        method, ctx["model"], ctx["batches"], density, scope, iterations, seed, invert=invert
    )
    return {n: m.cpu() for n, m in masks.items()}
