"""Magnitude pruning: one-shot or gradual, global or layerwise, unstructured or N:M.

**What.** Zeroes the smallest-magnitude weights and keeps them at zero. One-shot prunes to the
target sparsity at one Time; gradual pruning raises sparsity along Zhu & Gupta's cubic
schedule, ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_end - t_0))^3``, pruning every
``every`` between ``start`` and ``end`` ("To prune, or not to prune", 2017, eq. 1), and reaches
``sparsity`` exactly at ``end``. Global scope ranks all selected weights together (layers end
up with different sparsities); layerwise prunes each tensor to the same fraction. ``N:M``
keeps the N largest of every M consecutive weights along the input dimension; 2:4 is what
NVIDIA sparse tensor cores accelerate (Mishra et al. 2021, "Accelerating sparse deep neural
networks": ~1.3-1.6x on GEMM-heavy layers with no accuracy loss after retraining).

Masks are bool tensors in ``state.masks`` (and this algorithm's ``state_dict``), re-applied
after every optimizer step in one fused pass, so pruned weights are exactly zero whatever the
optimizer does (momentum, Adam, weight decay). Sparsity is measured from the weights and logged.

**When it helps.** Smaller and, with N:M on GPUs or sparse kernels, faster models. Gradual
pruning to 80-90% costs ~1 point or less on ResNets and Transformers (Gale et al. 2019, "The
state of sparsity in deep neural networks"); unstructured sparsity alone does not speed up
dense kernels, so wall-clock gains need 2:4 or a sparse runtime.

**Composes badly with.** Weight averaging that ignores masks (EMA/SWA average pruned weights
back to non-zero unless they read ``masks``), Factorize (both reduce the same weights), and
surgery that replaces pruned modules after masks exist.

Functional twins: :func:`magnitude_masks`, :func:`apply_masks`, :func:`measured_sparsity`.
"""

from __future__ import annotations

import fnmatch
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.time import Time

if TYPE_CHECKING:
    from collections.abc import Mapping

    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "MagnitudePruning",
    "apply_masks",
    "dense_state_dict",
    "magnitude_masks",
    "measured_sparsity",
    "parse_structure",
    "prunable_parameters",
    "to_semi_structured",
]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: ``fixed`` never prunes: it holds masks given through ``load_state_dict`` (lottery levels).
SCHEDULES = ("oneshot", "gradual", "fixed")


def parse_structure(structure: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4)."""
    if structure == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", structure)
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(
            f"structure must be 'unstructured' or 'N:M' with 0 < N < M, got {structure!r}"
        )
    return int(match[1]), int(match[2])


def prunable_parameters(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] = ()
) -> dict[str, nn.Parameter]:
    """Conv and linear weights by default; ``include``/``exclude`` are fnmatch patterns on
    parameter names (``include`` replaces the default selection, among tensors of rank >= 2)."""
    if include:
        chosen = {
            name: p
            for name, p in model.named_parameters()
            if p.dim() >= 2 and any(fnmatch.fnmatch(name, pat) for pat in include)
        }
    else:
        chosen = {
            f"{module_name}.weight" if module_name else "weight": module.weight
            for module_name, module in model.named_modules()
            if isinstance(module, _PRUNABLE)
        }
    return {n: p for n, p in chosen.items() if not any(fnmatch.fnmatch(n, pat) for pat in exclude)}


def _keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[scores.flatten().topk(keep, sorted=False).indices] = True
    return mask.view_as(scores)


def _n_of_m(weight: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    rows = weight.shape[0]
    flat = weight.detach().abs().reshape(rows, -1)
    if flat.shape[1] % m:
        raise ValueError(
            f"{name}: input dimension {flat.shape[1]} is not divisible by M={m} for {n}:{m} "
            "sparsity; exclude this parameter or pick M dividing it"
        )
    groups = flat.reshape(rows, -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(weight.shape)


def magnitude_masks(
    weights: dict[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    structure: str = "unstructured",
    masks: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Bool masks (True = keep) pruning ``sparsity`` of the weights by magnitude.

    Weights already masked out stay pruned (their score is below every live weight), so masks
    only shrink. For ``N:M`` the sparsity is ``1 - N/M`` by construction.
    """
    nm = parse_structure(structure)
    if nm is not None:
        return {name: _n_of_m(w, *nm, name) for name, w in weights.items()}
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("global", "layerwise"):
        raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")
    scores = {}
    for name, w in weights.items():
        score = w.detach().abs().float()
        if masks is not None and name in masks:
            score = torch.where(masks[name], score, torch.full_like(score, -1.0))
        scores[name] = score
    if scope == "layerwise":
        return {
            name: _keep_largest(s, s.numel() - round(sparsity * s.numel()))
            for name, s in scores.items()
        }
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _keep_largest(flat, flat.numel() - round(sparsity * flat.numel())).flatten()
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = keep[offset : offset + s.numel()].view_as(s)
        offset += s.numel()
    return out


@torch.no_grad()
def apply_masks(params: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Zero the pruned weights of all tensors in one fused pass."""
    if params:
        torch._foreach_mul_(params, masks)


@torch.no_grad()
def measured_sparsity(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of exact zeros, per tensor and ``"global"``."""
    zeros = {n: int((w == 0).sum()) for n, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    out = {n: zeros[n] / w.numel() for n, w in weights.items()}
    out["global"] = sum(zeros.values()) / max(total, 1)
    return out


def dense_state_dict(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain state dict with pruned weights as zeros, loadable without speedup."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, mask in masks.items():
        state[name] = state[name] * mask.to(state[name].dtype)
    return state


def to_semi_structured(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Swap 2:4-masked linear weights for torch's semi-structured sparse tensors (CUDA only,
    fp16/bf16): the GPU inference path that actually runs faster."""
    from torch.sparse import to_sparse_semi_structured

    for module_name, module in model.named_modules():
        name = f"{module_name}.weight" if module_name else "weight"
        if isinstance(module, nn.Linear) and name in masks:
            weight = module.weight
            if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
                raise RuntimeError(
                    f"{name}: semi-structured sparsity needs a CUDA fp16/bf16 weight, got "
                    f"{weight.dtype} on {weight.device}"
                )
            dense = (weight.detach() * masks[name]).contiguous()
            module.weight = nn.Parameter(to_sparse_semi_structured(dense), requires_grad=False)
    return model


class MagnitudePruning(Algorithm):
    """Prune conv/linear weights by magnitude and keep them at exactly zero."""

    name = "magnitude_pruning"

    def __init__(
        self,
        sparsity: float = 0.5,
        schedule: str = "oneshot",
        at: str = "0.5dur",
        start: str = "0.1dur",
        end: str = "0.7dur",
        every: str = "100ba",
        initial_sparsity: float = 0.0,
        scope: str = "global",
        structure: str = "unstructured",
        include: list[str] | None = None,
        exclude: list[str] = (),  # noqa: B006 - an immutable default
    ) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"magnitude_pruning.sparsity must be in [0, 1), got {sparsity}")
        if not 0.0 <= initial_sparsity <= sparsity:
            raise ValueError("magnitude_pruning.initial_sparsity must be in [0, sparsity]")
        if schedule not in SCHEDULES:
            raise ValueError(
                f"magnitude_pruning.schedule must be one of {', '.join(SCHEDULES)}, "
                f"got {schedule!r}"
            )
        if scope not in ("global", "layerwise"):
            raise ValueError(f"magnitude_pruning.scope: 'global' or 'layerwise', got {scope!r}")
        self.nm = parse_structure(structure)
        self.sparsity = sparsity if self.nm is None else 1 - self.nm[0] / self.nm[1]
        self.schedule, self.scope, self.structure = schedule, scope, structure
        self.at, self.start, self.end = Time.parse(at), Time.parse(start), Time.parse(end)
        self.every = Time.parse(every)
        self.initial_sparsity = initial_sparsity
        self.include, self.exclude = list(include or []), list(exclude)
        self.masks: dict[str, torch.Tensor] = {}
        self._params: list[torch.Tensor] = []
        self._float_masks: list[torch.Tensor] = []
        self._times: dict[str, float] = {}

    def time_constants(self) -> dict[str, Time]:
        # Pruning that starts (or ends) after the run never reaches its sparsity.
        if self.schedule == "oneshot":
            return {"at": self.at}
        return {"start": self.start, "end": self.end} if self.schedule == "gradual" else {}

    def declare(self) -> Declaration:
        return Declaration(
            events={
                Event.FIT_START: Access(reads={"model.weights"}, writes={"masks", "model.weights"}),
                Event.BATCH_END: Access(reads={"model.weights"}, writes={"masks", "model.weights"}),
            }
        )

    def first_prune_time(self) -> Time | None:
        return {"oneshot": self.at, "gradual": self.start}.get(self.schedule)

    # -- schedule -------------------------------------------------------------------------

    def target_sparsity(self, batch: float) -> float:
        """Sparsity the schedule asks for after ``batch`` steps (batches converted at fit start)."""
        if self.schedule == "oneshot":
            return self.sparsity if batch >= self._times["at"] else 0.0
        start, end = self._times["start"], self._times["end"]
        if batch < start:
            return 0.0
        progress = min(1.0, (batch - start) / (end - start)) if end > start else 1.0
        return self.sparsity + (self.initial_sparsity - self.sparsity) * (1 - progress) ** 3

    def _due(self, batch: int) -> bool:
        t = self._times
        if self.schedule == "fixed":
            return False
        if self.schedule == "oneshot":
            return batch == round(t["at"])
        start, end, every = round(t["start"]), round(t["end"]), max(1, round(t["every"]))
        return batch == end or (start <= batch < end and (batch - start) % every == 0)

    # -- events ---------------------------------------------------------------------------

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._start(state, logger)
            return
        batch = state.timestamp.batch
        if self._due(batch):
            self._prune(state, logger, self.target_sparsity(batch))
        if self._params:
            apply_masks(self._params, self._float_masks)

    def _start(self, state: State, logger: Logger) -> None:
        conv = state.converter
        self._times = {
            key: conv.to_batches(getattr(self, key)) for key in ("at", "start", "end", "every")
        }
        if self.schedule == "gradual" and self._times["end"] < self._times["start"]:
            raise ConfigError("algorithms.magnitude_pruning: end must not be before start")
        params = prunable_parameters(state.model, self.include, self.exclude)
        if not params:
            raise ConfigError("algorithms.magnitude_pruning: no parameter matches include/exclude")
        if self.nm is not None:  # fail before the first step, not at the pruning time
            n, m = self.nm
            for name, weight in params.items():
                width = weight[0].numel()
                if width % m:
                    raise ConfigError(
                        f"algorithms.magnitude_pruning: {name} has input dimension {width}, "
                        f"not divisible by M={m} for {n}:{m} sparsity; add it to exclude "
                        f"(e.g. exclude: ['{name}']) or pick an M dividing it"
                    )
        self._named = params
        if self.schedule == "fixed" and not self.masks:
            raise ConfigError("algorithms.magnitude_pruning: schedule 'fixed' needs masks loaded")
        if self.masks:  # resumed, or fixed: masks came from load_state_dict
            self._install(state, {n: m.to(params[n].device) for n, m in self.masks.items()})
            apply_masks(self._params, self._float_masks)
        elif self._due(state.timestamp.batch):  # pruning at initialisation ("0ba")
            self._prune(state, logger, self.target_sparsity(state.timestamp.batch))
            apply_masks(self._params, self._float_masks)

    def _prune(self, state: State, logger: Logger, sparsity: float) -> None:
        masks = magnitude_masks(self._named, sparsity, self.scope, self.structure, self.masks)
        self._install(state, masks)
        state.masks_updated_at = state.timestamp.batch
        apply_masks(self._params, self._float_masks)
        measured = measured_sparsity(self._named)
        logger.log_metrics(
            {"sparsity/target": sparsity, **{f"sparsity/{k}": v for k, v in measured.items()}}
        )

    def _install(self, state: State, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        state.masks = dict(masks)
        self._params = [self._named[n] for n in masks]
        self._float_masks = [m.to(self._named[n].dtype) for n, m in masks.items()]

    def state_dict(self) -> dict:
        return {"masks": {n: m.cpu() for n, m in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.masks = {n: m.bool() for n, m in state.get("masks", {}).items()}

    def check_composition(self, algorithms: Mapping[str, Algorithm]) -> list[str]:
        problems = []
        if self.schedule == "gradual":
            start, end = self.start, self.end
            if start.unit == end.unit and end < start:
                problems.append(f"end ({end}) is before start ({start})")
        return problems
