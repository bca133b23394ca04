"""The one total order of the built-in model surgery at INIT.

Every algorithm here rewrites ``model.modules`` at INIT; two writers of one field with no
declared order are a write-write conflict in the engine's plan. Rather than each algorithm
spelling out the others it precedes and follows (lists that drift apart), they take their
``runs_after``/``runs_before`` from their place in this sequence. Why this order: ALiBi
replaces attention first (as it declares); the activation swap precedes the GLU so that a
GLU built after it inherits the model's activation; attention surgery (qk_norm, then rotary,
so the plan matches the order the two transforms run in) follows the layer replacements;
the vision layer swaps and the dtype/layout changes come last. Pairs that never meet (vision
surgery on a transformer) are ordered anyway, for one total order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from speedup.algorithm import Access, Declaration
from speedup.event import Event

# Private to the algorithms package: no algorithm and no functional twin lives here.
__all__: list[str] = []

INIT_SURGERY_ORDER: tuple[str, ...] = (
    "alibi",
    "relu_squared",
    "gated_linear_units",
    "stochastic_depth",
    "blurpool",
    "factorize",
    "qk_norm",
    "rotary",
    "squeeze_excite",
    "weight_standardization",
    "ghost_batchnorm",
    "low_precision_groupnorm",
    "low_precision_layernorm",
    "gyro_dropout",
    "channels_last",
    "no_op_model",
)


def init_neighbours(name: str) -> dict[str, set[str]]:
    """``runs_after``/``runs_before`` for ``name``: the surgery before and after it."""
    at = INIT_SURGERY_ORDER.index(name)
    return {
        "runs_after": set(INIT_SURGERY_ORDER[:at]),
        "runs_before": set(INIT_SURGERY_ORDER[at + 1 :]),
    }


def init_surgery(
    name: str,
    *,
    reads: Iterable[str] = ("model.modules",),
    events: Mapping[Event, Access] | None = None,
    **declaration: Any,
) -> Declaration:
    """The declaration of the INIT surgery ``name``: it rewrites ``model.modules`` at INIT
    (reading ``reads``), in its place of :data:`INIT_SURGERY_ORDER`. ``events`` are its other
    events; ``declaration`` the rest (``model_kinds``, ``data_kinds``, ``incompatible_with``,
    ``unused_parameters``)."""
    init = {Event.INIT: Access(reads=set(reads), writes={"model.modules"})}
    return Declaration(events={**init, **(events or {})}, **init_neighbours(name), **declaration)
