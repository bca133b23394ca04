"""The NaN/Inf guard: a non-finite loss or gradient never reaches the weights or a checkpoint.

Once per step, after the backward pass(es) and before the optimizer step, one fused check
looks at the batch's loss and at its gradients: ``torch._foreach_norm`` takes every gradient's
L2 norm in one call, the norms are summed with the loss into one small tensor, summed across
processes in a distributed run (one all-reduce, so that all of them decide alike) and read with
one host sync. A NaN or an infinity anywhere in a gradient makes its norm non-finite; so does a
finite gradient whose squared norm overflows its dtype (beyond ~1.8e19 in float32). That second
case matters: with AdamW at lr=1e6 the loss stays finite while the gradients reach ~1e21, and
Adam's second moment (the mean of squared gradients) overflows to inf; the guard stops such a
step before it happens.

* ``stop`` (default) raises :class:`NonFiniteLossError` naming the step, before the optimizer
  step, so nothing after the last good checkpoint is written;
* ``skip`` drops the batch's gradients (torch optimizers leave a parameter without a gradient
  untouched: no update, no momentum or weight decay) and training goes on; skips are counted and
  logged.

With fp16 and a GradScaler, non-finite gradients are the scaler's business: it skips those steps
and lowers the loss scale, as designed, so the guard checks only the loss there (checking the
gradients too would stop or skip what the scaler already handles). Gradient accumulation needs
nothing special: the check sees the accumulated gradients of all microbatches and their summed
loss.

Whatever the mode, :func:`refuse_nonfinite` (called by every checkpoint write) refuses to write a
checkpoint whose weights or optimizer state hold NaN or inf, and stops the run with the same
error: a diverged state is never saved over a good one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from speedup import distributed
from speedup.callback import Callback
from speedup.errors import NonFiniteLossError

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "NonFiniteGuard",
    "NonFiniteLossError",
    "NONFINITE_MODES",
    "gradients_norm_sum",
    "nonfinite_tensors",
    "refuse_nonfinite",
]

NONFINITE_MODES = ("stop", "skip")


def _local_gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    grads = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if type(grad) is not torch.Tensor and hasattr(grad, "to_local"):
                grad = grad.to_local()  # FSDP2: this process's shard (the others check theirs)
            if grad.is_sparse:
                grad = grad.coalesce().values()
            grads.append(grad)
    return grads


def gradients_norm_sum(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The sum of the L2 norms of this process's gradients (float32, one fused call): finite if
    and only if every gradient is finite and none has a squared norm that overflows its dtype.
    None when no parameter has a gradient."""
    grads = _local_gradients(optimizer)
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    return torch.stack(norms).sum(dtype=torch.float32)


class NonFiniteGuard(Callback):
    """Stops the run, or skips the batch, when the training loss or a gradient is NaN or
    infinite (see the module docstring for what is checked when)."""

    def __init__(self, mode: str = "stop") -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite: {mode!r} is not allowed; allowed: stop, skip")
        self.mode = mode
        self.skipped = 0

    def after_train_batch(self, state: State, logger: Logger) -> None:
        values = state.train_metrics["loss"].detach().float().reshape(1)
        if state.scaler is None:  # the same shape on every process, gradients or none
            grad_norm = gradients_norm_sum(state.optimizer)
            grad_norm = values.new_zeros(1) if grad_norm is None else grad_norm.reshape(1)
            values = torch.cat([values, grad_norm.to(values.device)])
        if distributed.is_distributed():  # every process must take the same decision
            values = distributed.all_reduce_sum(values.clone())
        found = values.tolist()  # one host sync per batch
        if all(math.isfinite(v) for v in found):
            return
        loss = found[0]
        ts = state.timestamp
        where = f"step {ts.batch + 1} (epoch {ts.epoch}, batch {ts.batch_in_epoch + 1} of it)"
        if math.isfinite(loss):
            what = f"the gradient norm is {found[1]} (training loss {loss:.4g})"
        else:
            what = f"training loss is {loss}"
        for group in state.optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        if self.mode == "stop":
            raise NonFiniteLossError(
                f"{what} at {where}; stopped before the optimizer step, so the weights and the "
                "last checkpoint are untouched. Common causes: a learning rate too high for this "
                "batch size, fp16 without loss scaling, bad input data. Set nonfinite=skip to "
                "skip such batches instead.",
                step=ts.batch + 1,
            )
        self.skipped += 1
        logger.log_metrics({"nonfinite/skipped_batches": self.skipped})
        warnings.warn(f"{what} at {where}: batch skipped", stacklevel=2)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = int(state.get("skipped", 0))


def _floating(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _floating(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _floating(value, f"{prefix}.{i}" if prefix else str(i))


@torch.no_grad()
def nonfinite_tensors(state: Any) -> list[str]:
    """Dotted names of the floating-point tensors in ``state`` (nested dicts and lists, e.g.
    ``{"model": model.state_dict(), "optimizer": optimizer.state_dict()}``) that hold a NaN or
    an infinity; one host sync per device."""
    named = list(_floating(state, ""))
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, tensor) in enumerate(named):
        by_device.setdefault(tensor.device, []).append(i)
    bad = []
    for indices in by_device.values():
        finite = torch.stack([torch.isfinite(named[i][1]).all() for i in indices]).tolist()
        bad += [i for i, ok in zip(indices, finite) if not ok]
    return [named[i][0] for i in sorted(bad)]


def refuse_nonfinite(parts: Mapping[str, Any], step: int, target: Any) -> None:
    """Raise :class:`NonFiniteLossError` if the weights or optimizer state about to be written
    to the checkpoint ``target`` hold NaN or inf. Collective in a distributed run: every process
    refuses together (under FSDP only rank 0 holds the gathered state)."""
    bad = nonfinite_tensors({k: parts[k] for k in ("model", "optimizer") if k in parts})
    if not distributed.all_reduce_max(len(bad)):
        return
    shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    found = f"non-finite values in {shown}" if bad else "non-finite values (found by rank 0)"
    raise NonFiniteLossError(
        f"refusing to write checkpoint {target} at step {step}: {found}. The run stopped "
        "without saving it. Common causes: a learning rate too high for this batch size, fp16 "
        "without loss scaling, an optimizer whose state overflowed.",
        step=step,
    )
