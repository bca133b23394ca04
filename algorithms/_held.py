"""Copies of a model's tensors that an algorithm holds beside the model.

EMA's average, Lookahead's slow weights, SWA's average and schedule-free's training weights
are ``{state-dict name: tensor}`` dicts that must name the model's tensors, follow them onto
their device, trade places with them for evaluation, and go into checkpoints as CPU copies.
Those steps live here once, so the algorithms agree on them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# Private to the algorithms package: no algorithm and no functional twin lives here.
__all__: list[str] = []


def check_names(held: Mapping[str, object], live: Mapping[str, object], lead: str) -> None:
    """ValueError ``{lead}: missing [...], unexpected [...]`` unless ``held`` names exactly
    the tensors ``live`` does (missing: in ``live`` only; unexpected: in ``held`` only)."""
    if held.keys() != live.keys():
        raise ValueError(
            f"{lead}: missing {sorted(live.keys() - held.keys())}, "
            f"unexpected {sorted(held.keys() - live.keys())}"
        )


def pair(
    held: dict[str, torch.Tensor], live: Mapping[str, torch.Tensor], lead: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(held, live)`` tensors in ``live``'s order, after checking the names (see
    :func:`check_names`) and moving each held tensor, in ``held``, to its live tensor's device
    and dtype (a checkpoint loads onto the CPU; the model may since have moved)."""
    check_names(held, live, lead)
    for name, tensor in live.items():
        if held[name].device != tensor.device or held[name].dtype != tensor.dtype:
            held[name] = held[name].to(device=tensor.device, dtype=tensor.dtype)
    return [held[n] for n in live], list(live.values())


@torch.no_grad()
def exchange(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """Swap the values of paired tensors in place (one tensor-sized temporary at a time), so
    every reference to them (optimizer, masks, DDP/FSDP views) stays valid."""
    for x, y in zip(a, b, strict=True):
        held = x.clone()
        x.copy_(y)
        y.copy_(held)


def cpu_copies(tensors: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Detached CPU copies for a state dict: what a checkpoint stores must not change with
    training after the save. None (nothing held yet) stays None."""
    if tensors is None:
        return None
    return {n: t.detach().to("cpu", copy=True) for n, t in tensors.items()}


def from_saved(tensors: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The held dict a state dict saved with :func:`cpu_copies` restores (a copy of the
    mapping, so the caller's state dict is not changed by later moves)."""
    return dict(tensors) if tensors is not None else None
