"""Declaration checks: does an algorithm change only what it declared?

``Engine(..., check_declarations=True)`` (or any Engine built inside
``with checking_declarations():``, or with the environment variable
``SPEEDUP_CHECK_DECLARATIONS=1``) wraps each algorithm's ``apply`` in :func:`checked_apply`,
which digests the state before and after the call and raises
:class:`~speedup.errors.ConformanceError` naming the algorithm, the event and the field when a
field outside that event's ``writes`` changed. It is a testing aid, used by the conformance
kit (:mod:`speedup.testing`): digests cost a pass over the weights per call. Off, the
engine's dispatch tables are exactly the plain ones and nothing here runs.

It lives in the core, beside the engine that calls it, because the kit itself builds
workload models and data and so sits above the core.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from speedup.errors import ConformanceError

if TYPE_CHECKING:
    from speedup.algorithm import Algorithm
    from speedup.event import Event
    from speedup.logger import Logger
    from speedup.state import State

__all__ = [
    "changed_fields",
    "checked_apply",
    "checking_declarations",
    "declarations_checked_by_default",
    "state_digest",
]

_CHECKING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "speedup_check_declarations", default=False
)


@contextlib.contextmanager
def checking_declarations(enabled: bool = True) -> Iterator[None]:
    """Engines built inside (Trainers too) check declarations unless told otherwise."""
    token = _CHECKING.set(enabled)
    try:
        yield
    finally:
        _CHECKING.reset(token)


def declarations_checked_by_default() -> bool:
    """Whether an Engine built now checks declarations when not told: inside
    :func:`checking_declarations`, or with ``SPEEDUP_CHECK_DECLARATIONS`` set (not 0)."""
    if _CHECKING.get():
        return True
    return os.environ.get("SPEEDUP_CHECK_DECLARATIONS", "").strip() not in ("", "0")


def checked_apply(
    algorithm: Algorithm, event: Event, writes: frozenset[str]
) -> Callable[..., None]:
    """``algorithm.apply``, raising :class:`~speedup.errors.ConformanceError` when a call at
    ``event`` changes a field outside ``writes``."""
    apply = algorithm.apply

    def checked(event_: Event, state: State, logger: Logger) -> None:
        before = state_digest(state, writes)
        apply(event_, state, logger)
        changed = changed_fields(before, state_digest(state, writes))
        if changed:
            declared = ", ".join(sorted(writes)) or "nothing"
            raise ConformanceError(
                f"{algorithm.name} changed {', '.join(changed)} at {event.name} (step "
                f"{state.timestamp.batch}) without declaring it: its declaration writes "
                f"{declared} there; add the field(s) to "
                f"Access(writes=...) for Event.{event.name}, or leave them unchanged",
                algorithm.name,
                event,
                changed,
            )

    return checked


def _tensor_digest(t: Any) -> tuple[Any, ...]:
    """dtype, shape and a hash of the bytes: equal iff the values are (layout aside)."""
    import torch

    flat = t.detach().reshape(-1).contiguous()
    try:
        raw = flat.view(torch.uint8).cpu().numpy()
    except (RuntimeError, TypeError):  # sparse, quantized, ...: fall back to identity
        return (str(t.dtype), tuple(t.shape), "id", id(t))
    return (str(t.dtype), tuple(t.shape), hashlib.blake2b(raw, digest_size=16).digest())


def _value_digest(value: Any, identity: bool = True) -> Any:
    """A comparable digest of a value: tensors by content (and object identity when asked),
    containers recursively, plain scalars as themselves, anything else by identity."""
    import torch

    if isinstance(value, torch.Tensor):
        content = _tensor_digest(value)
        return (id(value), content) if identity else content
    if isinstance(value, Mapping):
        return tuple((str(k), _value_digest(v, identity)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_value_digest(v, identity) for v in value))
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    return ("object", id(value))


def _keyed(items: Iterator[tuple[str, Any, Any]]) -> dict[str, tuple[int, Any]]:
    """name -> (identity of the owner, value): compared only where the owner is the same
    object before and after, so replaced modules count as structure, not as writes."""
    return {name: (id(owner), value) for name, owner, value in items}


def _model_modules(state: State) -> Any:
    model = state.model
    return (
        id(model),
        tuple((n, type(m), id(m)) for n, m in model.named_modules()),
        tuple((n, id(p)) for n, p in model.named_parameters()),
        tuple(n for n, _ in model.named_buffers()),
    )


def _model_weights(state: State) -> dict[str, tuple[int, Any]]:
    # Parameters and persistent buffers, as checkpoints hold them; non-persistent buffers
    # (blur filters, dropout masks) are derived state, not weights.
    return _keyed(
        (n, t, _tensor_digest(t)) for n, t in state.model.state_dict(keep_vars=True).items()
    )


def _model_grads(state: State) -> dict[str, tuple[int, Any]]:
    return _keyed(
        (n, p, None if p.grad is None else _tensor_digest(p.grad))
        for n, p in state.model.named_parameters()
    )


def _model_mode(state: State) -> dict[str, tuple[int, Any]]:
    modes = _keyed((f"module {n}", m, m.training) for n, m in state.model.named_modules())
    modes.update(
        _keyed((f"param {n}", p, p.requires_grad) for n, p in state.model.named_parameters())
    )
    return modes


def _optimizer(state: State) -> Any:
    opt = state.optimizer
    if opt is None:
        return None
    groups = tuple(
        (
            tuple(id(p) for p in g["params"]),
            _value_digest({k: v for k, v in g.items() if k not in _LR_KEYS + ("params",)}),
        )
        for g in opt.param_groups
    )
    slots = tuple((id(p), _value_digest(dict(s))) for p, s in opt.state.items())
    return (id(opt), groups, slots)


_LR_KEYS = ("lr", "initial_lr")


def _lr(state: State) -> Any:
    if state.optimizer is None:
        return None
    return tuple(
        tuple(_value_digest(g.get(k), identity=False) for k in _LR_KEYS)
        for g in state.optimizer.param_groups
    )


def _shallow(obj: Any) -> Any:
    """An object's own attributes: plain values as themselves, others by identity."""
    attributes = getattr(obj, "__dict__", {})
    plain = (bool, int, float, str, type(None))
    return (
        id(obj),
        tuple((k, v if isinstance(v, plain) else ("id", id(v))) for k, v in attributes.items()),
    )


#: How each declarable field is digested (``batch.<key>`` fields are added per key).
_DIGESTS: dict[str, Callable[[State], Any]] = {
    "outputs": lambda s: _value_digest(s.outputs),
    "loss": lambda s: _value_digest(s.loss),
    "model.modules": _model_modules,
    "model.weights": _model_weights,
    "model.grads": _model_grads,
    "model.mode": _model_mode,
    "masks": lambda s: (_value_digest(s.masks, identity=False), s.masks_updated_at),
    "optimizer": _optimizer,
    "lr": _lr,
    "scheduler": lambda s: tuple(_shallow(x) for x in s.schedulers),
    "dataloader": lambda s: _shallow(s.train_dataloader),
    "timestamp": lambda s: (id(s.timestamp), dataclasses.astuple(s.timestamp)),
    "max_duration": lambda s: repr(s.max_duration),
    "eval_metrics": lambda s: _value_digest(s.eval_metrics, identity=False),
    "stop": lambda s: (s.stop_requested, s.stop_reason),
    "precision": lambda s: (s.precision, id(s.scaler)),
}


def state_digest(state: State, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Digests of every declarable field of ``state`` except those in ``skip`` (a field's
    ``writes``: ``batch`` skips every ``batch.<key>``)."""
    digests = {name: digest(state) for name, digest in _DIGESTS.items() if name not in skip}
    if "batch" not in skip:
        for key, value in (state.batch or {}).items():
            if f"batch.{key}" not in skip:
                digests[f"batch.{key}"] = _value_digest(value)
    return digests


_MISSING = object()


def changed_fields(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The fields whose digests differ (a batch key added or removed counts as changed)."""
    changed = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name, _MISSING), after.get(name, _MISSING)
        if isinstance(old, dict) and isinstance(new, dict):  # keyed by owner: see _keyed
            same = all(
                old[k][1] == new[k][1] for k in old.keys() & new.keys() if old[k][0] == new[k][0]
            )
        else:
            same = old == new
        if not same:
            changed.append(name)
    return changed
