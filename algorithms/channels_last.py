"""Channels-last (NHWC) memory format for conv nets.

**What.** Stores every 4-D weight, buffer and input batch with the channels innermost
(``torch.channels_last``: strides ``(H*W*C, 1, W*C, C)``) instead of PyTorch's default NCHW.
The values, shapes and the math are unchanged; only the memory layout differs. Tensor-core
convolutions on NVIDIA GPUs (cuDNN) run natively in NHWC, so NCHW tensors are transposed
around every convolution; with NHWC weights and inputs the layout propagates through the
network's activations and gradients and those transposes disappear. The model is converted
once at INIT, after all other surgery (declared order), and each training batch's
``inputs`` at AFTER_DATALOADER, after any algorithm that rewrites them. Evaluation batches
are left as they come: a convolution with channels-last weights returns a channels-last
output whatever its input, so the layout takes over from the first layer.

**When it helps.** Conv nets on GPUs with tensor cores, in mixed precision. Composer's README
(speedup table at commit 6e87ec447, 2022-04) credits it with 1.5x time-to-train on
ResNet-101/ImageNet on 8xA100; it is in all of Composer's ResNet-50 recipes (method card
composer/algorithms/channels_last/README.md: "does not change the math or outcome of
training"). On CPUs there is no reliable gain: a probe on this project's 2-core machine
found no consistent winner between NCHW and NHWC (../shared/research/speed.md). Expected
effect: higher GPU throughput, identical accuracy.

**Composes badly with.** Layers without channels-last kernels (some custom or 3-D ops), which
convert back and forth and can make the model slower (Composer's card mentions UNet).
Surgery after it would add NCHW weights: channels_last runs after every surgery algorithm.

Functional twin: :func:`apply_channels_last` (and :func:`to_channels_last` for a batch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from speedup.algorithms._init_order import init_neighbours
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["ChannelsLast", "apply_channels_last", "to_channels_last"]

#: The algorithms that rewrite ``batch.inputs`` at AFTER_DATALOADER: the layout is changed
#: after them. (At INIT the conversion takes its place in the one order of model surgery.)
_INPUT_WRITERS = ("progressive_resizing", "cutout", "colout", "selective_backprop")


def to_channels_last(inputs: torch.Tensor) -> torch.Tensor:
    """``inputs`` in channels-last layout if it is 4-D (``[N, C, H, W]``); otherwise as is.
    Returns ``inputs`` itself when it already is channels-last (no copy)."""
    if inputs.dim() != 4:
        return inputs
    return inputs.contiguous(memory_format=torch.channels_last)


def apply_channels_last(model: nn.Module) -> nn.Module:
    """Convert ``model``'s 4-D parameters and buffers to channels-last, in place.

    The parameter objects are kept (only their storage changes), so an optimizer built before
    still holds them. Returns ``model``.
    """
    return model.to(memory_format=torch.channels_last)


class ChannelsLast(Algorithm):
    """Store weights and inputs channels-last (NHWC) so GPU convolutions skip transposes."""

    name = "channels_last"
    # No arguments: the tuner only switches it on or off.
    SEARCH_SPACE = {}

    def __init__(self) -> None:
        pass

    def declare(self) -> Declaration:
        return Declaration(
            events={
                # The layout of every weight and buffer changes; the module structure does not.
                Event.INIT: Access(reads={"model.modules"}, writes={"model.weights"}),
                Event.AFTER_DATALOADER: Access(reads={"batch.inputs"}, writes={"batch.inputs"}),
            },
            runs_after={*init_neighbours("channels_last")["runs_after"], *_INPUT_WRITERS},
            runs_before=init_neighbours("channels_last")["runs_before"],
            model_kinds={"cnn"},
            data_kinds={"image"},
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            apply_channels_last(state.model)
        else:
            state.batch["inputs"] = to_channels_last(state.batch["inputs"])
