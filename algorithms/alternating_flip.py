"""Alternating flip: a derandomised horizontal flip.

**What.** Random horizontal flipping shows each image mirrored with probability 1/2 every
epoch, independently, so over two epochs a quarter of the images are seen only unmirrored and
a quarter only mirrored. Jordan (2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
arXiv 2404.00498, section "Alternating flip") derandomises it: in epoch 0 each image is
flipped with probability 1/2 (drawn once, per image); in every odd epoch every image is shown
in the orientation opposite to its epoch-0 one, and in every even epoch in its epoch-0
orientation. Every image is thus seen both ways within every pair of epochs. The decision is
keyed by the image's index in the training set, not by its position in the shuffled order,
so the data order stays the loader's. This follows the reference loader of airbench
(KellerJordan/cifar10-airbench, ``airbench94_muon.py``): a Bernoulli(1/2) mask over the
whole training set flips it at epoch 0, and odd epochs flip the result once more.

Here the mask comes from a generator seeded by ``seed`` (the run's seed by default), so it
is the same on every process and after a resume; the orientation in an epoch is a function
of the mask and the epoch's parity only, so a run resumed mid-epoch shows every image as the
uninterrupted run would. The algorithm swaps the train loader's in-memory image tensor for
the epoch's flipped copy at each epoch start (one pass over the set per epoch, nothing per
step) and turns off the loader's own random flip (a train transform with a ``flip`` switch,
such as Shapes-2D's): two flips would wash each other out.

**When it helps.** Wherever random flipping helps at all: the paper's abstract reports that
it "improves over the standard method in every case where flipping is beneficial over no
flipping at all". The airbench README figure (``img/airbench94_intro.png``) gives CIFAR-10
accuracy for alternating vs random flipping of 93.28 vs 93.10% at 10 epochs, 93.87 vs
93.75% at 20, 94.07 vs 94.01% at 40 and 94.16 vs 94.12% at 80: the gain is largest for
short runs (roughly 1.3-1.5x fewer epochs to the same accuracy at 10-20 epochs, interpolating
the random curve) and fades as training lengthens. No extra compute per step.

**Composes badly with.** Data whose label changes under a mirror (digits, text, left/right
classes): like any flip it must preserve the label. Runs shorter than two epochs or stopping
mid-epoch: the pairing completes only over whole pairs of epochs. Data loaders that are not
in memory (a torch ``Dataset`` read per sample) are refused at fit start; a train transform
that flips at random without a ``flip`` switch (CIFAR-10's crop-and-flip) keeps flipping, which
a warning names. No effect on evaluation.

Functional twin: :func:`alternating_flip` (with :func:`epoch_zero_flips` and
:func:`flips_at_epoch`).
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

import torch

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["AlternatingFlip", "alternating_flip", "epoch_zero_flips", "flips_at_epoch"]

#: Mixed into the seed so that the mask is not drawn from the very stream that shuffles the
#: data when both use the run's seed.
_SALT = 0xF11B


def epoch_zero_flips(num_samples: int, seed: int) -> torch.Tensor:
    """Which of ``num_samples`` images are flipped in epoch 0: an independent Bernoulli(1/2)
    draw per image (bool ``[num_samples]``), a function of ``seed`` only."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    generator = torch.Generator().manual_seed(int(seed) + _SALT)
    return torch.rand(num_samples, generator=generator) < 0.5


def flips_at_epoch(first: torch.Tensor, epoch: int) -> torch.Tensor:
    """The flip state of every image in ``epoch``: the epoch-0 state ``first`` in even
    epochs, its complement in odd ones."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return ~first if epoch % 2 else first.clone()


def alternating_flip(
    images: torch.Tensor,
    first: torch.Tensor,
    epoch: int,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """``images`` (``[N, ..., W]``) mirrored along the last dim where the alternating flip
    says so in ``epoch``.

    ``first`` is the epoch-0 state of the whole training set (:func:`epoch_zero_flips`);
    ``indices`` are the training-set indices of ``images`` (default: ``images`` is the whole
    set, in order), so a batch from any loader that knows its samples' indices can be flipped.
    """
    state = flips_at_epoch(first, epoch)
    if indices is not None:
        state = state[indices.to(state.device)]
    if state.shape[0] != images.shape[0]:
        raise ValueError(
            f"{images.shape[0]} images but {state.shape[0]} flip decisions; pass the images' "
            "training-set indices"
        )
    where = state.to(images.device).view(-1, *([1] * (images.dim() - 1)))
    return torch.where(where, images.flip(-1), images)


class AlternatingFlip(Algorithm):
    """Flip each training image in epoch 0 at random, then in alternate orientations."""

    name = "alternating_flip"

    #: Offered to the tuner on/off (it has no argument worth searching).
    SEARCH_SPACE = {}

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"alternating_flip.seed must be an integer or null, got {seed!r}")
        #: Seed of the epoch-0 mask; None: the run's seed, fixed at the first fit start.
        self.seed = seed
        self._first: torch.Tensor | None = None
        self._tensors: dict[str, torch.Tensor] | None = None  # the loader's own tensors
        self._installed: dict[str, torch.Tensor] | None = None  # what we put in their place
        self._parity: int | None = None

    def declare(self) -> Declaration:
        access = Access(reads={"dataloader", "timestamp"}, writes={"dataloader"})
        return Declaration(
            events={Event.FIT_START: access, Event.EPOCH_START: access},
            data_kinds={"image"},
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        loader = state.train_dataloader
        if event == Event.FIT_START:
            self._take_over(loader, state.seed)
        self._install(loader, state.timestamp.epoch)

    def _take_over(self, loader: Any, run_seed: int) -> None:
        """Remember the loader's own image tensor, draw the mask, switch the loader's flip off."""
        tensors = getattr(loader, "tensors", None)
        if not isinstance(tensors, dict) or not isinstance(tensors.get("inputs"), torch.Tensor):
            raise ConfigError(
                "algorithms.alternating_flip: needs a train dataloader over in-memory image "
                f"tensors (speedup's TensorBatchLoader, as shapes2d and cifar10 use); got "
                f"{type(loader).__name__}"
            )
        if tensors is not self._installed:  # a second fit() finds our copy: keep the original
            self._tensors = tensors
        images = self._tensors["inputs"]
        if images.dim() < 3:
            raise ConfigError(
                "algorithms.alternating_flip: the training inputs must be images [N, C, H, W] "
                f"(or [N, H, W]); got shape {tuple(images.shape)}"
            )
        if self.seed is None:
            self.seed = int(run_seed)
        self._first = epoch_zero_flips(images.shape[0], self.seed)
        transform = getattr(loader, "transform", None)
        if getattr(transform, "flip", False) is True:
            # A copy, never the shared object: the same data splits may serve another run.
            transform = copy.copy(transform)
            transform.flip = False
            loader.transform = transform
        elif transform is not None and not hasattr(transform, "flip"):
            shown = getattr(transform, "__qualname__", None) or type(transform).__name__
            warnings.warn(
                f"alternating_flip: the train transform {shown} has no "
                "`flip` switch to turn off; if it flips at random itself, the alternating "
                "flip is washed out",
                stacklevel=2,
            )
        self._parity = None

    def _install(self, loader: Any, epoch: int) -> None:
        """Point the loader at this epoch's orientation of every image (idempotent)."""
        assert self._tensors is not None and self._first is not None
        parity = epoch % 2
        if parity == self._parity and loader.tensors is self._installed:
            return
        images = alternating_flip(self._tensors["inputs"], self._first, parity)
        # A new dict, so the dict the loader was built from (and whoever shares it) is intact.
        self._installed = {**self._tensors, "inputs": images}
        loader.tensors = self._installed
        self._parity = parity

    def flipped(self, epoch: int) -> torch.Tensor:
        """Which training images are shown mirrored in ``epoch`` (after the first fit start)."""
        if self._first is None:
            raise RuntimeError("alternating_flip: the mask is drawn at fit start")
        return flips_at_epoch(self._first, epoch)

    def state_dict(self) -> dict:
        # The mask is a function of the seed; the parity comes from the restored timestamp.
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        seed = state.get("seed")
        self.seed = None if seed is None else int(seed)
