"""Stochastic depth: randomly skip residual branches during training.

**What.** Huang et al. (2016, "Deep networks with stochastic depth", ECCV) train a ResNet whose
block ``l`` computes ``relu(b_l f_l(x) + shortcut(x))`` with ``b_l ~ Bernoulli(1 - d_l)``:
the residual branch ``f_l`` is dropped with probability ``d_l``, leaving the identity path.
Their linear decay rule (section 3, survival ``p_l = 1 - (l / L)(1 - p_L)``) is, in drop
rates, ``d_l = (l / L) * drop_rate`` for block ``l = 1..L`` in depth order, so the first
block is almost always kept and the last one is dropped with ``drop_rate``;
``drop_distribution="uniform"`` uses ``drop_rate`` everywhere. Two granularities:

* ``method="block"`` (the paper): one draw per block per step for the whole batch; a dropped
  branch is not computed at all, so training gets cheaper (the expected depth with the
  linear rule is ``L (1 - drop_rate (L + 1) / (2 L))`` blocks).
* ``method="sample"`` (Composer's sample-wise variant, also called drop-path): one draw per
  sample, the branch is computed and multiplied by a ``[N, 1, 1, 1]`` 0/1 mask: no compute
  saving, but every sample sees its own random depth and the step cost is steady.

Kept branches are scaled by ``1 / (1 - d_l)`` during training ("inverted" scaling, as in
drop-path), so the expected output equals the deterministic network's and evaluation runs
the plain network with no drop and no rescaling (Huang et al. instead multiply by ``p_l`` at
test time; the two are the same in expectation). ``drop_warmup`` ramps every rate linearly
from 0 to its target over that Time, set before each batch.

Surgery replaces torchvision ``BasicBlock``/``Bottleneck`` and any core
:class:`~speedup.model.ResidualBlock` (the CIFAR ResNets' blocks) by :class:`StochasticBlock`,
which adopts the block's submodules under the same names: parameters and state-dict keys are
unchanged.

**When it helps.** Deep ResNets trained long enough to overfit. Huang et al. (Table 1):
110-layer ResNet, CIFAR-10 test error 6.41% -> 5.25% (with gains on CIFAR-100 and SVHN too),
with linear decay to ``p_L = 0.5`` (drop_rate 0.5), and about 25% less training time from
the skipped blocks. Composer's method card (composer/algorithms/stochastic_depth/README.md):
sample-wise, drop_rate 0.1, linear: +0.4 points top-1 on ResNet-50 and ResNet-101/ImageNet,
~5% longer wall-clock; its "hot" ResNet-50 recipe uses it. The defaults here are that
setting.

**Composes badly with.** Short schedules (a regulariser: it costs accuracy when training is
too short to overfit). Block-wise drops leave parameters unused in some steps: DDP needs
``find_unused_parameters`` and ``torch.compile`` recompiles per drop pattern; sample-wise
has neither issue. Other strong regularisers at once (diminishing returns).

Functional twin: :func:`apply_stochastic_depth` (with :func:`drop_path` and
:func:`block_drop_rates`).
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from speedup.algorithms._init_order import init_surgery
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.event import Event
from speedup.model import ResidualBlock
from speedup.surgery import replace_modules
from speedup.time import Time, schedule_time

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "DISTRIBUTIONS",
    "METHODS",
    "StochasticBlock",
    "StochasticDepth",
    "apply_stochastic_depth",
    "block_drop_rates",
    "drop_path",
    "residual_blocks",
]

METHODS = ("sample", "block")
DISTRIBUTIONS = ("linear", "uniform")


def block_drop_rates(
    num_blocks: int, drop_rate: float, distribution: str = "linear"
) -> list[float]:
    """Drop probability of each of ``num_blocks`` blocks in depth order: ``drop_rate`` for all
    (``uniform``), or ``drop_rate * l / num_blocks`` for block ``l = 1..num_blocks``
    (``linear``, Huang et al. 2016's linear decay rule)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if distribution == "uniform":
        return [drop_rate] * num_blocks
    return [drop_rate * (i + 1) / num_blocks for i in range(num_blocks)]


def drop_path(x: torch.Tensor, drop_rate: float, training: bool = True) -> torch.Tensor:
    """Zero whole samples of ``x`` (dim 0) with probability ``drop_rate`` and scale the rest by
    ``1 / (1 - drop_rate)``, so the expectation is ``x``. Identity when not ``training`` or
    ``drop_rate`` is 0. Draws from torch's RNG on ``x``'s device."""
    if not training or drop_rate <= 0.0:
        return x
    if drop_rate >= 1.0:
        raise ValueError(f"drop_rate must be < 1, got {drop_rate}")
    keep = 1.0 - drop_rate
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask.div_(keep)


def _layout(block: nn.Module) -> str | None:
    """Which residual block this is, or None when it is not one we can make stochastic."""
    if isinstance(block, StochasticBlock):
        return None
    if isinstance(block, ResidualBlock):
        return "residual"
    resnet = sys.modules.get("torchvision.models.resnet")  # only if torchvision is in use
    if resnet is not None:
        if isinstance(block, resnet.Bottleneck):
            return "bottleneck"
        if isinstance(block, resnet.BasicBlock):
            return "basic"
    return None


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of ``model`` that stochastic depth applies to, in depth order
    (module definition order, which is execution order for ResNets)."""
    return [m for m in model.modules() if _layout(m) is not None or isinstance(m, StochasticBlock)]


class StochasticBlock(nn.Module):
    """A ResNet block whose residual branch is dropped at random while training.

    Adopts the original block's submodules under the same names (so parameters and
    state-dict keys do not change) and computes ``relu(branch * b / (1 - d) + shortcut)``.
    ``drop_rate`` is the current probability ``d`` (the schedule's target times the warmup
    factor); ``target_drop_rate`` is where warmup ends. In eval mode, or at ``d = 0``, it is
    exactly the original block.
    """

    def __init__(self, block: nn.Module, drop_rate: float, method: str = "sample") -> None:
        super().__init__()
        layout = _layout(block)
        if layout is None:
            raise TypeError(f"not a supported residual block: {type(block).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.layout = layout
        for name, child in block.named_children():
            self.add_module(name, child)
        if layout == "residual":  # its class's branch/shortcut, run on the adopted parts
            self._residual = type(block)
            for name, value in vars(block).items():  # plain attributes: stride, pad, None paths
                if not name.startswith("_") and name != "training":
                    setattr(self, name, value)
        elif block.downsample is None:  # torchvision: identity shortcut
            self.downsample = None
        self.method = method
        self.target_drop_rate = float(drop_rate)
        self.drop_rate = float(drop_rate)
        self.train(block.training)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual function ``f(x)`` (up to, not including, the addition)."""
        if self.layout == "residual":
            return self._residual.branch(self, x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.layout == "bottleneck":
            out = self.bn3(self.conv3(F.relu(out)))
        return out

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "residual":
            return self._residual.shortcut(self, x)
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        rate = self.drop_rate if self.training else 0.0
        if rate <= 0.0:
            return F.relu(self.branch(x) + identity)
        if self.method == "block":
            # One host-side draw decides for the whole batch; a dropped branch is not run.
            if float(torch.rand(())) < rate:
                return F.relu(identity)
            return F.relu(self.branch(x) * (1.0 / (1.0 - rate)) + identity)
        return F.relu(drop_path(self.branch(x), rate) + identity)

    def extra_repr(self) -> str:
        return f"layout={self.layout}, method={self.method}, drop_rate={self.drop_rate:.4g}"


def _check(drop_rate: float, drop_distribution: str, method: str, prefix: str = "") -> None:
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"{prefix}drop_rate must be in [0, 1), got {drop_rate}")
    if drop_distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"{prefix}drop_distribution must be one of {', '.join(DISTRIBUTIONS)}, "
            f"got {drop_distribution!r}"
        )
    if method not in METHODS:
        raise ValueError(f"{prefix}method must be one of {', '.join(METHODS)}, got {method!r}")


def apply_stochastic_depth(
    model: nn.Module,
    drop_rate: float = 0.1,
    drop_distribution: str = "linear",
    method: str = "sample",
) -> list[StochasticBlock]:
    """Make every supported residual block of ``model`` stochastic, in place, with drop rates
    from :func:`block_drop_rates` in depth order. Returns the blocks, in that order.

    Parameters are adopted, not copied, so an optimizer built before still holds them.
    Already-stochastic blocks get their rates reassigned (applying twice is idempotent).
    """
    _check(drop_rate, drop_distribution, method)
    blocks = residual_blocks(model)
    rates = dict(zip(map(id, blocks), block_drop_rates(len(blocks), drop_rate, drop_distribution)))
    for block in blocks:
        if isinstance(block, StochasticBlock):
            block.target_drop_rate = block.drop_rate = rates[id(block)]
            block.method = method

    def build(child: nn.Module) -> nn.Module | None:
        if id(child) in rates and not isinstance(child, StochasticBlock):
            return StochasticBlock(child, rates[id(child)], method)
        return None

    replace_modules(model, build)
    return [m for m in model.modules() if isinstance(m, StochasticBlock)]


class StochasticDepth(Algorithm):
    """Drop ResNet residual branches at random while training (Huang et al. 2016)."""

    name = "stochastic_depth"
    # Huang et al. 2016 (Sec. 4): p_L = 0.5 on CIFAR, 0.2 with fewer layers.
    SEARCH_SPACE = {"drop_rate": {"type": "float", "low": 0.05, "high": 0.5}}

    def __init__(
        self,
        drop_rate: float = 0.1,
        drop_distribution: str = "linear",
        method: str = "sample",
        drop_warmup: str = "0.0dur",
    ) -> None:
        _check(drop_rate, drop_distribution, method, "stochastic_depth.")
        warmup = schedule_time("stochastic_depth.drop_warmup", drop_warmup)
        self.drop_rate = drop_rate
        self.drop_distribution = drop_distribution
        self.method = method
        self.drop_warmup = warmup
        #: The stochastic blocks made at INIT, in depth order.
        self.blocks: list[StochasticBlock] = []

    @property
    def warms_up(self) -> bool:
        return self.drop_warmup.value > 0 and self.drop_rate > 0

    def time_constants(self) -> dict[str, Time]:
        return {"drop_warmup": self.drop_warmup} if self.warms_up else {}

    def declare(self) -> Declaration:
        # Its place in the one total order of INIT surgery (_init_order): it wraps whole
        # blocks, so the layer swaps inside them come after.
        events = {}
        if self.warms_up:
            # The blocks' current drop rates follow the clock; set before each batch's forward.
            events[Event.BEFORE_TRAIN_BATCH] = Access(reads={"timestamp"}, writes={"model.mode"})
        return init_surgery(
            "stochastic_depth",
            events=events,
            model_kinds={"cnn"},
            data_kinds={"image"},
            # A block-wise drop skips the branch: its parameters get no gradient that step.
            unused_parameters=self.method == "block",
        )

    def warmup_factor(self, state: State) -> float:
        """How far the rates are through their warmup, in [0, 1]."""
        if not self.warms_up:
            return 1.0
        warmup = state.converter.to_batches(self.drop_warmup)
        return min(1.0, state.timestamp.batch / warmup) if warmup > 0 else 1.0

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.blocks = apply_stochastic_depth(
                state.model, self.drop_rate, self.drop_distribution, self.method
            )
            if not self.blocks:
                warnings.warn(
                    "stochastic_depth found no ResNet block (torchvision BasicBlock/Bottleneck "
                    "or the CIFAR ResNets' blocks): it has no effect",
                    stacklevel=2,
                )
            if self.warms_up:
                for block in self.blocks:  # INIT is before the first batch: start at 0
                    block.drop_rate = 0.0
            return
        factor = self.warmup_factor(state)
        for block in self.blocks:
            block.drop_rate = block.target_drop_rate * factor
