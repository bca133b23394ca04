"""Layer freezing: progressively stop training the earliest layers.

**What.** Networks converge bottom up: lower layers' representations stabilise early in
training (Raghu et al. 2017, "SVCCA", who propose "freeze training" from this), so training
them to the end wastes backward compute. FreezeOut (Brock et al. 2017, "FreezeOut:
accelerate training by progressively freezing layers") anneals each layer's learning rate to
zero on a schedule that ends earlier for earlier layers, then excludes it from the backward
pass. This is Composer's simpler form: at each epoch end, the fraction of layers frozen is
``freeze_level * (t - freeze_start) / (1 - freeze_start)`` for elapsed fraction
``t > freeze_start`` (0 before), and the first ``floor(fraction * (L - 1))`` of the ``L``
layers are frozen. The last layer (the output layer) is never frozen, even at
``freeze_level: 1.0``: freeze training freezes lower layers while the top keeps learning
(Raghu et al. 2017), and Composer's reference ``freeze_layers``
(composer/algorithms/layer_freezing/layer_freezing.py) counts and freezes only
``flat_children[0:-1]``, every layer but the last. A frozen parameter gets
``requires_grad = False``: backward no longer computes its gradient (nor, once a whole prefix
is frozen, anything below it), its ``.grad`` stays None, and optimizers skip parameters
without a gradient, so the weight stays exactly constant (no momentum, no weight decay).
Freezing is never undone.

**Layers.** The ordered list of modules that own parameters directly
(``module.parameters(recurse=False)`` is non-empty), in ``named_modules()`` order, which is
registration order: a conv and its BatchNorm are two layers, a residual block contributes
its convs and norms in the order its ``__init__`` created them, and a module holding its own
parameter (a ViT's class token, a position embedding) counts too, however deeply nested. This
assumes modules are registered in forward order, as in Sequential and the usual torchvision
and Hugging Face nets; where they are not, the "earliest" layers are the first registered. A
parameter shared by several layers (tied input and output embeddings) freezes only when every
layer holding it is frozen, so a weight tied to the output layer never freezes. BatchNorm
running statistics of frozen layers keep updating in train mode; only parameters freeze.

**When it helps.** Composer's method card (Brock et al.'s FreezeOut, simplified) reports
about 5% higher throughput on ResNet-50/ImageNet for 0.5-1 point lower accuracy and marks it
as not Pareto-improving. Brock et al.'s abstract reports up to 20% wall-clock savings with
a 3% loss in accuracy for DenseNets, a 20% speedup without loss for ResNets, and no gain for
VGG (CIFAR; their per-layer schedule, not this linear one). It helps where the
backward of early layers is a large share of the step and late accuracy is driven by the top
layers (fine-tuning). Defaults follow Composer: ``freeze_start=0.5dur``, ``freeze_level=1.0``.

**Composes badly with.** Methods that change the early layers' weights after freezing
(weight rewinding writes them once more, then they stay; surgery after fit start), and
anything relying on every parameter having a gradient (a DDP wrapper without
``find_unused_parameters``). Freezing happens at epoch ends only, so a run shorter than two
epochs never freezes.

Functional twins: :func:`freeze_layers`, :func:`freeze_fraction`, :func:`freezable_layers`,
:func:`frozen_count`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.time import TimeUnit, schedule_time

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["LayerFreezing", "freezable_layers", "freeze_fraction", "freeze_layers", "frozen_count"]


def freezable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module owning parameters directly, in registration order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if next(module.parameters(recurse=False), None) is not None
    ]


def freeze_fraction(elapsed: float, freeze_start: float = 0.5, freeze_level: float = 1.0) -> float:
    """Fraction of layers frozen at ``elapsed`` (a fraction of the run): 0 until
    ``freeze_start``, then rising linearly to ``freeze_level`` at the end of training."""
    if elapsed <= freeze_start:
        return 0.0
    progress = min(1.0, (elapsed - freeze_start) / (1.0 - freeze_start))
    return progress * freeze_level


def _freeze_first(layers: list[tuple[str, nn.Module]], count: int) -> list[nn.Parameter]:
    """Freeze the parameters whose every owning layer is among the first ``count``."""
    last_owner: dict[int, int] = {}
    params: dict[int, nn.Parameter] = {}
    for index, (_, module) in enumerate(layers):
        for p in module.parameters(recurse=False):
            last_owner[id(p)] = index
            params[id(p)] = p
    frozen = []
    for key, p in params.items():
        if last_owner[key] < count:
            p.requires_grad_(False)
            p.grad = None
            frozen.append(p)
    return frozen


def frozen_count(fraction: float, layers: int) -> int:
    """How many of ``layers`` layers are frozen at ``fraction``: ``floor(fraction * (L - 1))``,
    so the last (output) layer never is."""
    return math.floor(fraction * max(layers - 1, 0) + 1e-9)  # absorb 0.3 * 10 = 2.999...


def freeze_layers(model: nn.Module, fraction: float) -> int:
    """Freeze the first ``floor(fraction * (L - 1))`` of the model's L layers (see
    :func:`freezable_layers`; the last layer always keeps training); returns how many."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    layers = freezable_layers(model)
    count = frozen_count(fraction, len(layers))
    _freeze_first(layers, count)
    return count


class LayerFreezing(Algorithm):
    """Progressively freeze the earliest layers at epoch ends (Composer's FreezeOut variant)."""

    name = "layer_freezing"
    # Composer's method card: freeze from 0.5dur; Brock et al. 2017 (FreezeOut) t_0 0.5-0.8.
    SEARCH_SPACE = {
        "freeze_start": {"type": "float", "low": 0.3, "high": 0.8, "unit": "dur"},
        "freeze_level": {"type": "float", "low": 0.5, "high": 1.0},
    }

    def __init__(self, freeze_start: str = "0.5dur", freeze_level: float = 1.0) -> None:
        start = schedule_time("layer_freezing.freeze_start", freeze_start)
        if start.unit == TimeUnit.DURATION and start.value >= 1.0:
            raise ValueError(f"layer_freezing.freeze_start must be in [0dur, 1dur), got {start}")
        if not 0.0 < freeze_level <= 1.0:
            raise ValueError(f"layer_freezing.freeze_level must be in (0, 1], got {freeze_level}")
        self.freeze_start = start
        self.freeze_level = freeze_level
        #: Layers frozen so far (the first ``frozen_layers`` of :func:`freezable_layers`).
        self.frozen_layers = 0
        self._start_fraction = 0.0

    def declare(self) -> Declaration:
        return Declaration(
            events={
                # Re-freezes the saved prefix on resume; the optimizer exists by then.
                Event.FIT_START: Access(reads={"timestamp", "max_duration"}, writes={"model.mode"}),
                Event.EPOCH_END: Access(reads={"timestamp"}, writes={"model.mode"}),
            },
            unused_parameters=True,  # frozen layers get no gradient: DDP must expect that
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        layers = freezable_layers(state.model)
        if event == Event.FIT_START:
            try:
                self._start_fraction = float(
                    state.converter.convert(self.freeze_start, TimeUnit.DURATION).value
                )
            except ValueError as err:
                raise ConfigError(
                    f"algorithms.layer_freezing.freeze_start: {self.freeze_start}: {err}"
                ) from None
            if self._start_fraction >= 1.0:
                raise ConfigError(
                    f"algorithms.layer_freezing.freeze_start: {self.freeze_start} is at or after "
                    "the end of training; nothing would freeze"
                )
            if not self.frozen_layers and state.timestamp.epoch > 0:
                # Started part-way (seek: rewinding, timing a late phase): freeze what the
                # schedule had frozen at the last epoch end, as a run from step 0 would have.
                conv = state.converter
                total = conv.to_batches(state.max_duration)
                boundary = state.timestamp.epoch * conv.batches_per_epoch
                elapsed = min(1.0, boundary / total) if total else 1.0
                fraction = freeze_fraction(elapsed, self._start_fraction, self.freeze_level)
                self.frozen_layers = frozen_count(fraction, len(layers))
            if self.frozen_layers:  # resumed (or started part-way): before any step runs
                _freeze_first(layers, self.frozen_layers)
            return
        fraction = freeze_fraction(state.elapsed_fraction, self._start_fraction, self.freeze_level)
        count = frozen_count(fraction, len(layers))
        if count > self.frozen_layers:
            self.frozen_layers = count
            _freeze_first(layers, count)
            logger.log_metrics(
                {
                    "layer_freezing/frozen_layers": count,
                    "layer_freezing/frozen_fraction": count / max(len(layers), 1),
                }
            )

    def state_dict(self) -> dict:
        return {"frozen_layers": self.frozen_layers}

    def load_state_dict(self, state: dict) -> None:
        self.frozen_layers = int(state.get("frozen_layers", 0))
