"""Annealed Gaussian gradient noise.

**What.** Before each optimizer step, adds independent Gaussian noise to every gradient
entry, with a variance that decays with the step ``t``: ``sigma_t^2 = eta / (1 + t)^gamma``
(Neelakantan et al. 2015, "Adding gradient noise improves learning for very deep networks",
arXiv:1511.06807, eq. 1; they fix ``gamma = 0.55`` and pick ``eta`` from {0.01, 0.3, 1.0}).
The noise is drawn from a generator seeded by the run's seed and the step, so every process
of a data-parallel run adds the same noise (the replicas stay identical) and a resumed run
redraws exactly the noise of the uninterrupted one, with no state to save.

**When it helps.** Deep or badly initialised networks that plain SGD trains slowly or not at
all: Neelakantan et al. report better results with noise for 20-layer fully connected
networks on MNIST (most of all from poor initialisations) and for models such as the Neural
Programmer and the Neural GPU. On well-normalised networks trained with a tuned optimizer
the effect is small and can be negative; it is not a wall-clock speedup by itself, and costs
one ``randn`` per parameter per step.

**Composes badly with.** Gradient clipping: the noise goes on the clipped gradient (declared
``runs_after`` gradient_clipping), so the final norm can exceed the
clipping threshold. SAM replaces the gradient at the same event: the noise goes on SAM's
gradient (``runs_after`` sam). Momentum and Adam's second moment average the noise out over
steps, which weakens it (the paper uses it with Adam all the same). Frozen parameters (no
gradient) get no noise.

Functional twins: :func:`add_gradient_noise` and :func:`noise_std`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.event import Event

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["GradientNoise", "add_gradient_noise", "noise_std"]


def noise_std(step: int, eta: float, gamma: float = 0.55) -> float:
    """The noise's standard deviation at ``step``: ``sqrt(eta / (1 + step) ** gamma)``."""
    return math.sqrt(eta / (1 + step) ** gamma)


@torch.no_grad()
def add_gradient_noise(
    parameters: Iterable[torch.nn.Parameter],
    std: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add ``N(0, std^2)`` noise to every ``.grad`` in place (parameters without a gradient
    are skipped); returns the global L2 norm of the gradient before the noise."""
    norms = []
    for p in parameters:
        if p.grad is None:
            continue
        norms.append(p.grad.float().norm())
        noise = torch.randn(p.grad.shape, generator=generator, device=p.grad.device)
        p.grad.add_(noise.to(p.grad.dtype), alpha=std)
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


class GradientNoise(Algorithm):
    """Annealed Gaussian gradient noise (Neelakantan et al. 2015)."""

    name = "gradient_noise"

    def __init__(self, eta: float = 0.01, gamma: float = 0.55, log_every: int = 10) -> None:
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
            raise ValueError(f"gradient_noise.eta must be > 0, got {eta!r}")
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gradient_noise.gamma must be >= 0, got {gamma!r}")
        if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every < 0:
            raise ValueError(
                f"gradient_noise.log_every must be an integer >= 0 (0: never), got {log_every!r}"
            )
        self.eta, self.gamma, self.log_every = float(eta), float(gamma), log_every

    def declare(self) -> Declaration:
        return Declaration(
            events={
                Event.AFTER_TRAIN_BATCH: Access(
                    reads={"model.grads", "timestamp"}, writes={"model.grads"}
                )
            },
            runs_after={"sam", "gradient_clipping"},
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        step = state.timestamp.batch
        std = noise_std(step, self.eta, self.gamma)
        device = next(state.model.parameters()).device
        generator = torch.Generator(device=device)
        generator.manual_seed(state.seed * 1_000_003 + step)  # the same on every process
        norm = add_gradient_noise(state.model.parameters(), std, generator)
        if self.log_every and step % self.log_every == 0:
            logger.log_metrics({"gradient_noise/std": std, "gradient_noise/grad_norm": norm})
