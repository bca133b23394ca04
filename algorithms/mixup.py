"""MixUp.

**What.** Trains on convex combinations of pairs of examples and of their labels,
``x = lam * x_i + (1 - lam) * x_j`` and ``y = lam * y_i + (1 - lam) * y_j`` with
``lam ~ Beta(alpha, alpha)`` (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization",
ICLR, eq. 1). As in the paper's reference code and Composer, one ``lam`` is drawn per batch
and the partner ``j`` of each example is given by a random permutation of the batch, so the
whole method is one gather and one ``lerp`` on the inputs. Small ``alpha`` puts most mass
near 0 and 1 (mild mixing); ``alpha = 1`` is uniform.

**When it helps.** Image classification trained long enough to overfit. Zhang et al. report
ImageNet ResNet-50 top-1 error 23.5% -> 23.3% at 90 epochs and 23.6% -> 22.1% at 200 epochs
with ``alpha = 0.2`` (Table 1: the gain grows with the budget; ``alpha`` in [0.1, 0.4] helps,
larger underfits), and CIFAR-10 DenseNet-BC-190 error 3.7% -> 2.7% (Table 2, ``alpha = 1``).
Composer's method card recommends ``alpha = 0.2`` on ImageNet and 1.0 on CIFAR-10; its
medium and hot ResNet-50 recipes use 0.2 and 0.25. Expected effect: higher final accuracy
on long schedules at negligible per-step cost; on short schedules it can cost accuracy.

**Composes badly with.** CutMix (both interpolate the targets: declared incompatible).
Other strong regularisers give diminishing returns (Composer's card). Losses that need class
indices: the mixed targets are probabilities ``[N, K]``, which ``soft_cross_entropy`` (every
:class:`~speedup.models.Classifier`) accepts. Label smoothing composes: it is ordered after
MixUp and smooths the mixed probabilities.

**How it runs here.** The inputs are mixed at AFTER_DATALOADER on the whole batch, so the
result does not depend on the microbatch size. The targets become probabilities at
BEFORE_LOSS (K is read from the model outputs) and the original class indices are put back at
BEFORE_BACKWARD, after every AFTER_LOSS hook (label smoothing restores its own copy at
AFTER_LOSS, after MixUp's position there), so metrics and callbacks see integer labels again.
Randomness (``lam`` and the permutation) comes from torch's global CPU RNG, which checkpoints
save: seeded runs repeat and resume exactly, on any device. Evaluation is never mixed.

Functional twin: :func:`mixup_batch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "Mixed",
    "MixUp",
    "MixingAlgorithm",
    "check_class_targets",
    "mix_targets",
    "mixup_batch",
    "random_permutation",
    "sample_beta",
    "sample_dirichlet",
]

#: The batch augmentations that write ``batch.inputs`` at AFTER_DATALOADER, in the order they
#: run: selective backprop must choose from the clean batch; per-image photometric and
#: geometric ops come next; ColOut shrinks after the per-image ops; mixing sees the final
#: pixels (CutMix's area is then exact); progressive resizing downsamples last.
AUGMENTATION_ORDER = (
    "selective_backprop",
    "randaugment",
    "augmix",
    "cutout",
    "colout",
    "mixup",
    "cutmix",
    "progressive_resizing",
)


def ordering(name: str) -> tuple[frozenset[str], frozenset[str]]:
    """``(runs_after, runs_before)`` for ``name`` from its place in :data:`AUGMENTATION_ORDER`.

    MixUp and CutMix are incompatible; they are ordered all the same so that a recipe naming
    both gets that one conflict, not a write-write conflict on top."""
    position = AUGMENTATION_ORDER.index(name)
    return (
        frozenset(AUGMENTATION_ORDER[:position]),
        frozenset(AUGMENTATION_ORDER[position + 1 :]),
    )


def image_augmentation(name: str) -> Declaration:
    """The declaration of a per-image augmentation (randaugment, augmix, cutout): rewrites
    ``batch.inputs`` at AFTER_DATALOADER, in its place of :data:`AUGMENTATION_ORDER`."""
    runs_after, runs_before = ordering(name)
    return Declaration(
        events={Event.AFTER_DATALOADER: Access(reads={"batch.inputs"}, writes={"batch.inputs"})},
        runs_after=runs_after,
        runs_before=runs_before,
        data_kinds={"image"},
    )


# -- random draws (CPU, from torch's global RNG or a generator) --------------------------------


def _log_gamma(concentration: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``log`` of Gamma(concentration, 1) draws by Marsaglia & Tsang (2000, ACM TOMS 26(3)):
    a squeeze-rejection sampler for shape >= 1, boosted by ``U ** (1 / a)`` for shape < 1.
    Works in log space so tiny shapes do not underflow. torch's own Gamma sampler takes no
    generator, hence this one."""
    a = concentration.to(torch.float64).flatten()
    small = a < 1
    d = torch.where(small, a + 1, a) - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    pending = torch.arange(a.numel())
    while pending.numel():  # each round accepts > 95% of what is left
        x = torch.randn(pending.numel(), generator=generator, dtype=torch.float64)
        u = torch.rand(pending.numel(), generator=generator, dtype=torch.float64)
        dp, cp = d[pending], c[pending]
        v = (1.0 + cp * x) ** 3
        positive = v > 0
        log_v = torch.log(torch.where(positive, v, torch.ones_like(v)))
        accept = positive & (torch.log(u) < 0.5 * x * x + dp - dp * v + dp * log_v)
        out[pending[accept]] = (torch.log(dp) + log_v)[accept]
        pending = pending[~accept]
    boost = torch.rand(a.numel(), generator=generator, dtype=torch.float64)
    out = torch.where(small, out + torch.log(boost) / a, out)
    return out.view(concentration.shape)


def sample_dirichlet(
    concentration: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Dirichlet draws over the last dimension of ``concentration`` (normalised Gammas)."""
    concentration = torch.as_tensor(concentration, dtype=torch.float64)
    if not bool((concentration > 0).all()):
        raise ValueError("Dirichlet concentrations must be > 0")
    return torch.softmax(_log_gamma(concentration, generator), dim=-1)


def sample_beta(
    a: float, b: float, size: tuple[int, ...] = (), generator: torch.Generator | None = None
) -> torch.Tensor:
    """Beta(a, b) draws of shape ``size`` (float64, CPU)."""
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta parameters must be > 0, got ({a}, {b})")
    concentration = torch.tensor([a, b], dtype=torch.float64).expand(*size, 2)
    return sample_dirichlet(concentration, generator)[..., 0]


def random_permutation(
    n: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A permutation of ``range(n)`` drawn on the CPU (the same on every device), moved to
    ``device``."""
    return torch.randperm(n, generator=generator).to(device, non_blocking=True)


# -- the math --------------------------------------------------------------------------------


class Mixed(NamedTuple):
    """A mixed batch: ``inputs``, soft ``targets`` [N, K], the weight ``lam`` of each example's
    own content and label, and ``permutation`` (example i is mixed with ``permutation[i]``)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    lam: float
    permutation: torch.Tensor


def mix_targets(
    targets: torch.Tensor, partner: torch.Tensor, lam: float, num_classes: int
) -> torch.Tensor:
    """``lam * onehot(targets) + (1 - lam) * onehot(partner)`` as float probabilities [N, K].

    Class indices ``[N]`` are one-hot encoded; floating ``[N, K]`` targets (already soft, or
    multi-hot) are mixed as they are."""
    if targets.dtype.is_floating_point:
        own, other = targets.float(), partner.float()
    else:
        own = F.one_hot(targets.long(), num_classes).float()
        other = F.one_hot(partner.long(), num_classes).float()
    return torch.lerp(other, own, lam)


def check_class_targets(targets: torch.Tensor, rows: int, name: str) -> None:
    """Raise ValueError unless ``targets`` are class indices [rows] or probabilities [rows, K]."""
    floating = targets.dtype.is_floating_point
    shape_ok = targets.dim() == 2 if floating else targets.dim() == 1
    if targets.shape[0] != rows or not shape_ok:
        raise ValueError(
            f"{name} needs class-index targets [N] or probabilities [N, K]; got "
            f"{tuple(targets.shape)} {targets.dtype} for {rows} inputs"
        )


def mixup_batch(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    alpha: float = 0.2,
    generator: torch.Generator | None = None,
) -> Mixed:
    """MixUp a batch: ``lam ~ Beta(alpha, alpha)`` once, a random partner per example.

    Returns :class:`Mixed` (``inputs, targets, lam, permutation``) with
    ``inputs = lam * inputs + (1 - lam) * inputs[permutation]`` and the same combination of
    the one-hot targets. ``inputs`` may have any shape ``[N, ...]``. Draws come from
    ``generator`` (a CPU generator) or torch's global RNG.

    Example::

        x, y, _, _ = mixup_batch(x, y, num_classes=10, alpha=0.2)
        loss = soft_cross_entropy(model(x), y)
    """
    return mix_batch("mixup", _mixup_inputs, inputs, targets, num_classes, alpha, generator)


#: ``mix(inputs, alpha, generator) -> (mixed inputs, lam, permutation)``.
MixInputs = Callable[
    [torch.Tensor, float, torch.Generator | None], tuple[torch.Tensor, float, torch.Tensor]
]


def mix_batch(
    name: str,
    mix: MixInputs,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    alpha: float,
    generator: torch.Generator | None,
) -> Mixed:
    """The functional twin of a :class:`MixingAlgorithm` (``name`` in error messages): check
    ``alpha`` and the class ``targets``, mix the inputs with ``mix`` and the one-hot targets
    by the same ``lam`` and permutation. :func:`mixup_batch` and CutMix's ``cutmix_batch``
    are this with their own ``mix``."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    check_class_targets(targets, inputs.shape[0], name)
    mixed, lam, permutation = mix(inputs, alpha, generator)
    soft = mix_targets(targets, targets[permutation], lam, num_classes)
    return Mixed(mixed, soft, lam, permutation)


def _mixup_inputs(
    inputs: torch.Tensor, alpha: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, float, torch.Tensor]:
    lam = float(sample_beta(alpha, alpha, generator=generator))
    permutation = random_permutation(inputs.shape[0], inputs.device, generator)
    return torch.lerp(inputs[permutation], inputs, lam), lam, permutation


# -- the algorithms ----------------------------------------------------------------------------


class MixingAlgorithm(Algorithm):
    """Base of MixUp and CutMix: mix the inputs at AFTER_DATALOADER, turn the targets into
    the matching probabilities at BEFORE_LOSS (per microbatch) and restore the class indices
    at BEFORE_BACKWARD. Subclasses set ``name`` and implement ``_mix``."""

    def __init__(self, alpha: float) -> None:
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{self.name}.alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        #: ``lam`` and the permutation of the current (last mixed) batch.
        self.lam: float | None = None
        self.permutation: torch.Tensor | None = None
        self._partners: torch.Tensor | None = None  # targets[permutation] of the whole batch
        self._cursor = 0  # first row of the next microbatch within the batch
        self._original: torch.Tensor | None = None  # the microbatch's targets while mixed

    def _mix(self, inputs: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
        """Return ``(mixed inputs, lam, permutation)``."""
        raise NotImplementedError

    def declare(self) -> Declaration:
        runs_after, runs_before = ordering(self.name)
        return Declaration(
            events={
                Event.AFTER_DATALOADER: Access(
                    reads={"batch.inputs", "batch.targets"}, writes={"batch.inputs"}
                ),
                Event.BEFORE_LOSS: Access(
                    reads={"batch.targets", "outputs"}, writes={"batch.targets"}
                ),
                Event.BEFORE_BACKWARD: Access(writes={"batch.targets"}),
            },
            runs_after=runs_after,
            # label_smoothing declares the same order; stated here too so it holds either way
            runs_before=runs_before | {"label_smoothing"},
            incompatible_with={"mixup", "cutmix"} - {self.name},
            data_kinds={"image"},
        )

    def match(self, event: Event, state: State) -> bool:
        if event == Event.BEFORE_LOSS:
            return self._partners is not None
        if event == Event.BEFORE_BACKWARD:
            return self._original is not None
        return True

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        batch = state.batch
        if event == Event.AFTER_DATALOADER:
            targets = batch["targets"]
            check_class_targets(targets, batch["inputs"].shape[0], self.name)
            batch["inputs"], self.lam, self.permutation = self._mix(batch["inputs"])
            self._partners = targets[self.permutation.to(targets.device)]
            self._cursor = 0
        elif event == Event.BEFORE_LOSS:
            targets = batch["targets"]
            rows = targets.shape[0]
            partners = self._partners[self._cursor : self._cursor + rows]
            if partners.shape[0] != rows:
                raise RuntimeError(
                    f"{self.name}: microbatch rows {self._cursor}..{self._cursor + rows} exceed "
                    f"the mixed batch of {self._partners.shape[0]}"
                )
            self._cursor += rows
            if self._cursor >= self._partners.shape[0]:
                self._partners = None  # the last microbatch of this batch
            self._original = targets
            classes = int(state.outputs.shape[-1])
            batch["targets"] = mix_targets(targets, partners, self.lam, classes)
        else:  # BEFORE_BACKWARD
            batch["targets"] = self._original
            self._original = None


class MixUp(MixingAlgorithm):
    """Train on convex combinations of example pairs and their labels (one lam per batch)."""

    name = "mixup"
    # Zhang et al. 2018 (mixup, Sec. 3.1): alpha 0.1-0.4 on ImageNet, 1.0 on CIFAR-10.
    SEARCH_SPACE = {"alpha": {"type": "float", "low": 0.1, "high": 1.0, "log": True}}

    def __init__(self, alpha: float = 0.2) -> None:
        super().__init__(alpha)

    def _mix(self, inputs: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
        return _mixup_inputs(inputs, self.alpha, None)
