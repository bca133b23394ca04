"""Lookahead: k fast steps forward, one step back towards slow weights.

**What.** Any optimizer takes ``k`` steps (the *fast* weights); then the *slow* weights move
a share ``alpha`` of the way towards them, ``slow <- slow + alpha * (fast - slow)``, and the
fast weights restart from there, ``fast <- slow`` (Zhang, Lucas, Hinton & Ba 2019, "Lookahead
Optimizer: k steps forward, 1 step back", NeurIPS, arXiv 1907.08610, Algorithm 1; defaults
k = 5, alpha = 0.5 as in torch-optimizer's ``Lookahead``). The slow weights start as the
weights at fit start and synchronise after steps k, 2k, ... (Algorithm 1; torch-optimizer
creates them after the first step instead, one step later). The inner optimizer's state
(momentum, Adam moments) is kept across synchronisations, as in torch-optimizer.
Synchronisation is written as one exponential-average update with ``decay = 1 - alpha``:
``slow <- decay * slow + (1 - decay) * fast; fast <- slow``.

``variant: ema`` is the "lookahead-EMA" of the CIFAR-10 speedruns (Jordan 2024, airbench,
``legacy/airbench94.py``: ``LookaheadState``; also hlb-CIFAR10): every 5 steps the same update
over every floating tensor of the state dict (BatchNorm statistics included), with a decay that
grows with the run, ``d(t) = 0.95**5 * (t / T)**3`` (no averaging early, 0.774 at the end),
and at the last step ``d = 1`` copies the average into the model. It depends on the run length
T, so a truncated run is not a prefix of a longer one.

Evaluations between synchronisations use the slow weights (swapped in at EVAL_START and back at
EVAL_END; ``eval_with_slow=False`` evaluates the fast ones), and the last step of the run
leaves the model holding them: Algorithm 1 returns the slow weights; airbench copies its
average in at the end. A run stopped early (early stopping) ends on the fast weights.

**When it helps.** Zhang et al. report faster, more robust convergence with little tuning
across CIFAR, ImageNet (ResNet-50 among them), language modelling and translation, and lower
sensitivity to the inner optimizer's learning rate. The EMA variant is part of airbench94's
94% CIFAR-10 in 3.29 s (Jordan 2024, arXiv 2404.00498); airbench94_muon drops it. Expected
effect on short runs: a smoother loss and a small accuracy gain at equal steps; none where the
schedule already anneals to zero.

**Cost.** One copy of the weights (and, for ``ema``, the buffers), a fused ``lerp`` and a copy
every ``k`` steps, and an in-place exchange at each evaluation.

**Composes badly with.** Schedule-free optimizers (they already average: "the EMA version of
primal averaging", their README) and EMA (two weight averages that both want to be the
evaluated model): declared incompatible. With pruning the slow weights keep the masks (masked
entries stay exactly zero); after a weight rewind (``rewinding`` with ``mode: weights``) the
slow weights restart from the rewound ones. SWA runs after it and averages the synchronised
weights.

Functional twin: :func:`lookahead_sync` (and :func:`ema_lookahead_decay` for the schedule).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from speedup.algorithms._held import check_names, cpu_copies, exchange, from_saved, pair
from torch import nn

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.time import Time, TimeUnit

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["Lookahead", "ema_lookahead_decay", "lookahead_sync"]

VARIANTS = ("standard", "ema")

Tensors = Mapping[str, torch.Tensor]


def ema_lookahead_decay(step: int, total: int, k: int = 5) -> float:
    """airbench's decay at ``step`` of ``total``: ``0.95**k * (step / total)**3`` (0.774 at
    the end with k = 5). The copy at the last step is separate: see :class:`Lookahead`."""
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total}")
    return 0.95**k * (min(step, total) / total) ** 3


def _named(source: nn.Module | Tensors, buffers: bool) -> dict[str, torch.Tensor]:
    """Floating parameters (and buffers) by state-dict name; a mapping passes through."""
    if not isinstance(source, nn.Module):
        return dict(source)
    found = dict(source.named_parameters())
    if buffers:
        found.update(source.named_buffers())
    return {n: t for n, t in found.items() if t.is_floating_point()}


@torch.no_grad()
def lookahead_sync(
    slow: nn.Module | Tensors, fast: nn.Module | Tensors, alpha: float, buffers: bool = False
) -> None:
    """One Lookahead synchronisation, in place: ``slow <- slow + alpha * (fast - slow)``, then
    ``fast <- slow``.

    ``slow`` and ``fast`` are modules or ``{name: tensor}`` mappings with the same names
    (floating tensors only; ``buffers=True`` includes a module's floating buffers, as the EMA
    variant does). ``alpha`` is Zhang et al.'s step towards the fast weights (0.5); the EMA
    variant passes ``1 - ema_lookahead_decay(t, T)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    held, live = _named(slow, buffers), _named(fast, buffers)
    check_names(held, live, "slow and fast weights differ")
    names = list(live)
    _sync([held[n] for n in names], [live[n] for n in names], alpha)


@torch.no_grad()
def _sync(held: list[torch.Tensor], live: list[torch.Tensor], alpha: float) -> None:
    if held:
        torch._foreach_lerp_(held, live, alpha)
        torch._foreach_copy_(live, held)


class Lookahead(Algorithm):
    """Lookahead (Zhang et al. 2019) around the run's optimizer, or airbench's lookahead-EMA.

    ``k`` is the number of fast steps between synchronisations; ``alpha`` the share of the
    way the slow weights move towards the fast ones (``standard`` only; ``ema`` follows
    ``0.95**k * (t/T)**3``). ``eval_with_slow`` evaluates the slow weights.
    """

    name = "lookahead"

    #: Tuner ranges: Zhang et al. 2019 (arXiv 1907.08610) report k in {5, 10} and alpha in
    #: {0.5, 0.8} all working.
    SEARCH_SPACE = {
        "k": {"type": "int", "low": 4, "high": 10},
        "alpha": {"type": "float", "low": 0.5, "high": 0.8},
    }

    def __init__(
        self,
        k: int = 5,
        alpha: float | None = None,
        variant: str = "standard",
        eval_with_slow: bool = True,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(
                f"lookahead.variant: unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"lookahead.k: the fast steps per synchronisation, >= 1; got {k!r}")
        if alpha is not None and variant == "ema":
            raise ValueError(
                "lookahead.alpha: the ema variant's step follows 0.95**k * (t/T)**3; "
                "alpha applies to variant standard only"
            )
        alpha = 0.5 if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(f"lookahead.alpha: a share in (0, 1]; got {alpha!r}")
        self.k = k
        self.alpha = float(alpha)
        self.variant = variant
        self.eval_with_slow = eval_with_slow
        #: The slow weights (``ema``: the average) by state-dict name.
        self.slow: dict[str, torch.Tensor] | None = None
        self.anchor = 0  # the batch the k-step cycle counts from
        self.synced_at = 0  # the batch of the last synchronisation (fast == slow then)
        self._total: float | None = None
        self._live: list[torch.Tensor] = []
        self._held: list[torch.Tensor] = []
        self._swapped = False
        self._restart_on_rewind = False

    def time_constants(self) -> dict[str, Time]:
        return {"k": Time(self.k, TimeUnit.BATCH)}  # longer than the run: it never syncs

    def declare(self) -> Declaration:
        swaps = Access(reads={"model.weights"}, writes={"model.weights"})
        events = {
            Event.FIT_START: Access(reads={"model.weights", "timestamp", "max_duration"}),
            Event.BATCH_END: Access(
                reads={"model.weights", "masks", "timestamp"}, writes={"model.weights"}
            ),
        }
        if self.eval_with_slow:
            events.update({Event.EVAL_START: swaps, Event.EVAL_END: swaps})
        return Declaration(
            events=events,
            # Average the pruned, rewound weights of this step; SWA averages the synced ones.
            # After ema only so that a plan naming both reports their incompatibility alone.
            runs_after={"magnitude_pruning", "rewinding", "ema"},
            runs_before={"swa"},
            incompatible_with={"ema", "schedule_free"},
        )

    # -- events -------------------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        if event == Event.EVAL_START:
            return bool(self._held) and state.timestamp.batch != self.synced_at
        if event == Event.EVAL_END:
            return self._swapped
        return True

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state)
        elif event == Event.BATCH_END:
            self._batch_end(state)
        elif event in (Event.EVAL_START, Event.EVAL_END):
            exchange(self._live, self._held)
            self._swapped = event == Event.EVAL_START

    def _fit_start(self, state: State) -> None:
        end = state.max_duration
        if end.unit == TimeUnit.SECOND:
            if self.variant == "ema":
                raise ConfigError(
                    f"algorithms.lookahead.variant: ema decays with the step's share of the run, "
                    f"and max_duration={end} is wall-clock; give max_duration in ep, ba, sp or tok"
                )
            self._total = None
        else:
            self._total = state.converter.to_batches(end)
        self._restart_on_rewind = any(
            other.name == "rewinding" and getattr(other, "mode", None) == "weights"
            for other in state.algorithms
        )
        if self.slow is None:
            self._restart(state)
        else:  # resumed, or a second fit
            self._bind(state.model)

    @torch.no_grad()
    def _batch_end(self, state: State) -> None:
        t = state.timestamp.batch
        if self._restart_on_rewind and state.masks_updated_at == t:
            self._restart(state)  # averaging across the rewind would mix two trainings
            return
        last = self._total is not None and t >= self._total
        if (t - self.anchor) % self.k == 0:
            if self.variant == "ema":
                assert self._total is not None
                alpha = 1.0 - ema_lookahead_decay(t, round(self._total), self.k)
            else:
                alpha = self.alpha
            torch._foreach_lerp_(self._held, self._live, alpha)
            self._mask(state)
            torch._foreach_copy_(self._live, self._held)
            self.synced_at = t
        elif last:  # the run ends mid-cycle: it leaves the slow weights (Algorithm 1's phi)
            torch._foreach_copy_(self._live, self._held)
            self.synced_at = t

    # -- the slow copy ------------------------------------------------------------------------

    @torch.no_grad()
    def _restart(self, state: State) -> None:
        live = _named(state.model, self.variant == "ema")
        self.slow = {n: t.detach().clone() for n, t in live.items()}
        self.anchor = self.synced_at = state.timestamp.batch
        self._bind(state.model)

    def _bind(self, model: nn.Module) -> None:
        assert self.slow is not None
        self._held, self._live = pair(
            self.slow,
            _named(model, self.variant == "ema"),
            "lookahead: the saved slow weights do not match the model",
        )

    def _mask(self, state: State) -> None:
        """Keep pruned entries of the slow weights at exactly zero."""
        if not state.masks:
            return
        assert self.slow is not None
        for name, mask in state.masks.items():
            if name in self.slow:
                self.slow[name].mul_(mask.to(self.slow[name].dtype))

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"slow": cpu_copies(self.slow), "anchor": self.anchor, "synced_at": self.synced_at}

    def load_state_dict(self, state: dict) -> None:
        self.slow = from_saved(state.get("slow"))
        self.anchor = int(state.get("anchor", 0))
        self.synced_at = int(state.get("synced_at", 0))
        self._live, self._held, self._swapped = [], [], False
