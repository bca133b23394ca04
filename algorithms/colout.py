"""ColOut.

**What.** Drops a random ``p_row`` fraction of the rows and ``p_col`` of the columns of the
images, so the network trains on smaller images that keep most of the content (Composer's
method, by Cory Stephenson at MosaicML; no paper). Here it is batch-wise: one set of rows and
columns for the whole batch, kept in their original order, taken with two ``index_select``
calls on the device at AFTER_DATALOADER. (Composer's sample-wise variant runs in the CPU
dataloader; with already-collated batches per-image sizes cannot differ.) Segmentation-style
targets that share the image's height and width lose the same rows and columns
(``resize_target``).

**When it helps.** Throughput, at a small accuracy cost. Composer's method card: with
``p_row = p_col = 0.15`` each step sees ``0.85 ** 2 = 72%`` of the pixels; batch-wise ColOut
gave ~11% more throughput for ResNet-50 on ImageNet in a CPU-bound setting, costing ~0.2%
top-1 on ImageNet and ~1% on CIFAR-10, and was a Pareto improvement for ResNet-50/ImageNet
and ResNet-56/CIFAR-10; its hot ResNet-50 recipe uses ``p_row = p_col = 0.05``. Expected
effect: faster steps (fewer pixels per conv) for slightly lower accuracy; only the
time-to-accuracy benchmark can tell whether it pays.

**Composes badly with.** Other resolution changers (progressive resizing, which runs after
it here and scales the already-shrunk image): returns diminish. Models that need a fixed input
size (MLPs, ViTs without interpolated position embeddings): declared for ``cnn`` models only.

Functional twin: :func:`colout_batch`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from speedup.algorithms.mixup import ordering

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["ColOut", "colout_batch", "colout_indices", "drop_rows_and_columns"]


def _kept(size: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    keep = max(1, size - round(p * size))
    return torch.randperm(size, generator=generator)[:keep].sort().values


def colout_indices(
    height: int,
    width: int,
    p_row: float = 0.15,
    p_col: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows and columns ColOut keeps (sorted, on the CPU): ``height - round(p_row *
    height)`` rows and likewise columns, at least one of each."""
    for key, p in (("p_row", p_row), ("p_col", p_col)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {p}")
    return _kept(height, p_row, generator), _kept(width, p_col, generator)


def drop_rows_and_columns(
    tensor: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Keep ``rows`` of dim -2 and ``cols`` of dim -1 of ``tensor``."""
    rows, cols = rows.to(tensor.device), cols.to(tensor.device)
    return tensor.index_select(-2, rows).index_select(-1, cols)


def colout_batch(
    inputs: torch.Tensor,
    p_row: float = 0.15,
    p_col: float = 0.15,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Drop the same random rows and columns from every image of ``inputs`` ``[..., H, W]``.

    The output is ``[..., H', W']`` with ``H' = H - round(p_row * H)``; the kept pixels are
    exactly the input's, in their original order."""
    if inputs.dim() < 2:
        raise ValueError(f"colout needs images [..., H, W], got shape {tuple(inputs.shape)}")
    rows, cols = colout_indices(inputs.shape[-2], inputs.shape[-1], p_row, p_col, generator)
    return drop_rows_and_columns(inputs, rows, cols)


class ColOut(Algorithm):
    """Drop random rows and columns of the whole batch: smaller images, faster steps."""

    name = "colout"
    # Composer's default drops 15% of rows and columns.
    SEARCH_SPACE = {
        "p_row": {"type": "float", "low": 0.05, "high": 0.3},
        "p_col": {"type": "float", "low": 0.05, "high": 0.3},
    }

    def __init__(
        self, p_row: float = 0.15, p_col: float = 0.15, resize_target: bool | str = "auto"
    ) -> None:
        for key, p in (("p_row", p_row), ("p_col", p_col)):
            if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p < 1.0):
                raise ValueError(f"colout.{key} must be in [0, 1), got {p}")
        if not (isinstance(resize_target, bool) or resize_target == "auto"):
            raise ValueError(
                f"colout.resize_target must be 'auto', true or false, got {resize_target!r}"
            )
        self.p_row = float(p_row)
        self.p_col = float(p_col)
        self.resize_target = resize_target

    def declare(self) -> Declaration:
        runs_after, runs_before = ordering(self.name)
        fields = {"batch.inputs"} | ({"batch.targets"} if self.resize_target else set())
        return Declaration(
            events={Event.AFTER_DATALOADER: Access(reads=fields, writes=fields)},
            runs_after=runs_after,
            runs_before=runs_before,
            model_kinds={"cnn"},
            data_kinds={"image"},
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        batch = state.batch
        inputs = batch["inputs"]
        height, width = inputs.shape[-2:]
        rows, cols = colout_indices(height, width, self.p_row, self.p_col)
        rows = rows.to(inputs.device, non_blocking=True)
        cols = cols.to(inputs.device, non_blocking=True)
        batch["inputs"] = drop_rows_and_columns(inputs, rows, cols)
        if not self.resize_target:
            return
        targets = batch.get("targets")
        if targets is not None and targets.dim() >= 3 and targets.shape[-2:] == (height, width):
            batch["targets"] = drop_rows_and_columns(targets, rows, cols)
        elif self.resize_target is True:
            shape = None if targets is None else tuple(targets.shape)
            raise ValueError(
                f"colout.resize_target is true but the targets {shape} are not [N, ..., H, W] "
                f"with the images' H, W = {height}, {width}"
            )
