"""Schedule-free AdamW / SGD: no learning-rate schedule, an average to evaluate.

**What.** Replaces the run's optimizer and its LR schedule by the schedule-free method of
Defazio et al. 2024 ("The Road Less Scheduled", arXiv 2405.15682, Algorithm 1), through the
authors' ``schedulefree`` package (``AdamWScheduleFree``, ``SGDScheduleFree``). Three
sequences: the base optimizer steps ``z <- z - lr * grad(y)``, the evaluation point is the
running average ``x <- (1 - c) x + c z`` with ``c`` proportional to ``lr_max**weight_lr_power``
(polynomial in the step with power ``r``), and gradients are taken at the interpolation ``y =
(1 - beta) z + beta x``. The model holds ``y`` while training and ``x`` otherwise: the
optimizer's ``eval()`` moves the weights to ``x``, ``train()`` back to ``y``. This algorithm
switches them at every event that needs it: ``x`` at EVAL_START, at the checkpoint events (so
every saved ``model.pt``, and the exported model, is ``x``, as the package's README requires)
and at FIT_END; ``y`` again before the next batch is drawn. Checkpoints are written at ``x``
with the optimizer in eval mode; the ``y`` weights are kept exactly (a copy taken at the
switch, in this algorithm's state), so a run that saves checkpoints, evaluates or resumes
trains bit for bit like one that does not. The other defaults are the package's: beta
(AdamW's beta1, SGD's momentum) 0.9, beta2 0.999, r 0, weight_lr_power 2, weight decay taken at
``y``. The lr and weight decay default to the run's optimizer's, per param group (``lr=None``,
``weight_decay=None``; the functional twin defaults to the package's lr, 0.0025 for AdamW and
1.0 for SGD). Warmup is the package's linear ``warmup_steps``, given here as a Time.

BatchNorm statistics are those accumulated at ``y``; the README suggests recomputing them at
``x`` before evaluating (about 50 training batches under ``no_grad``, model in train mode,
optimizer in eval mode, or PreciseBN). That is not done here: it costs those forward passes at
every evaluation; normalisation-free, LayerNorm and GroupNorm models need none of it.

**When it helps.** Runs whose length is not known in advance, or that should be good at every
point: no schedule to tune or restart. Schedule-free AdamW won the self-tuning track of the
AlgoPerf 2024 competition, and came second in external tuning (MLCommons leaderboard v0.5);
Defazio et al. report it matching or beating tuned cosine and linear-decay schedules across
their 28 problems. The README: schedule-free SGD wants 10-50x a scheduled
SGD's lr, AdamW 1-10x; a warmup helps; raise beta towards 0.95-0.98 on long runs.

**Composes badly with.** Any LR schedule other than constant (``wsd``, ``cosine``, a
``scheduler.warmup``: it replaces them; refused before training, use ``warmup`` here), SWA
(writes the LR), and other weight averages that would average ``y`` or swap weights at
evaluation (EMA, Lookahead: "the EMA version of primal averaging", the README); Muon (both
replace the optimizer); pruning and weight rewinding (they write ``y`` while ``x`` and ``z``
keep the pruned weights). All declared incompatible.

Functional twin: :func:`schedule_free_optimizer` (the package's optimizer from a spec, for
any loop: call its ``train()`` before training steps and ``eval()`` before evaluating or
saving).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from speedup.algorithms._held import cpu_copies, from_saved

from speedup.algorithm import Access, Algorithm, Declaration
from speedup.checkpoint import CheckpointSaver
from speedup.errors import ConfigError
from speedup.event import Event
from speedup.time import schedule_time

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = ["KINDS", "ScheduleFree", "schedule_free_optimizer"]

#: ``optimizer`` -> the package's class name.
KINDS = {"adamw": "AdamWScheduleFree", "sgd": "SGDScheduleFree"}
#: The package's default lr per kind.
DEFAULT_LR = {"adamw": 0.0025, "sgd": 1.0}


def schedule_free_optimizer(
    params: Iterable[Any],
    optimizer: str = "adamw",
    *,
    lr: float | None = None,
    beta: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
) -> torch.optim.Optimizer:
    """The ``schedulefree`` package's AdamW (``optimizer="adamw"``) or SGD over ``params``
    (tensors or param-group dicts), ``beta`` being AdamW's beta1 or SGD's momentum."""
    if optimizer not in KINDS:
        raise ValueError(f"optimizer {optimizer!r}: allowed {', '.join(KINDS)}")
    import schedulefree  # a declared dependency; imported here to keep `import speedup` light

    cls = getattr(schedulefree, KINDS[optimizer])
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    common = dict(
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
    )
    if optimizer == "adamw":
        return cls(params, betas=(beta, beta2), **common)
    return cls(params, momentum=beta, **common)


class ScheduleFree(Algorithm):
    """Replace the run's optimizer and LR schedule by schedule-free AdamW or SGD (Defazio et
    al. 2024); evaluate, checkpoint and finish at the averaged weights ``x``.

    ``optimizer`` is ``adamw`` or ``sgd``; ``lr``/``weight_decay`` ``None`` keep the run's
    optimizer's per group; ``beta`` is the interpolation (AdamW's beta1, SGD's momentum);
    ``warmup`` a Time of linear LR warmup (the package's ``warmup_steps``).
    """

    name = "schedule_free"

    #: Tuner ranges: Defazio et al. 2024 (arXiv 2405.15682) use beta 0.9 and a short warmup;
    #: both are searched around those values.
    SEARCH_SPACE = {
        "beta": {"type": "float", "low": 0.8, "high": 0.95},
        "warmup": {"type": "float", "low": 0.01, "high": 0.1, "unit": "dur"},
    }
    #: It replaces the LR schedule, so the recipe's must be constant without warmup.
    REQUIRES_CONFIG = {"scheduler": {"name": "constant"}}

    def __init__(
        self,
        optimizer: str = "adamw",
        lr: float | None = None,
        beta: float = 0.9,
        beta2: float = 0.999,
        weight_decay: float | None = None,
        warmup: str = "0ba",
        r: float = 0.0,
        weight_lr_power: float = 2.0,
    ) -> None:
        if optimizer not in KINDS:
            raise ValueError(
                f"schedule_free.optimizer: unknown {optimizer!r}; allowed: {', '.join(KINDS)}"
            )
        numbers = {"beta": beta, "beta2": beta2, "r": r, "weight_lr_power": weight_lr_power}
        numbers.update(
            {k: v for k, v in (("lr", lr), ("weight_decay", weight_decay)) if v is not None}
        )
        for key, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"schedule_free.{key}: a number; got {value!r}")
        for key in ("beta", "beta2"):
            if not 0.0 < numbers[key] < 1.0:
                raise ValueError(f"schedule_free.{key}: in (0, 1); got {numbers[key]!r}")
        for key in ("lr", "weight_decay"):
            if numbers.get(key, 0.0) < 0:
                raise ValueError(f"schedule_free.{key}: >= 0; got {numbers[key]!r}")
        self.optimizer = optimizer
        self.lr = lr
        self.beta = float(beta)
        self.beta2 = float(beta2)
        self.weight_decay = weight_decay
        self.warmup = schedule_time("schedule_free.warmup", warmup)
        self.r = float(r)
        self.weight_lr_power = float(weight_lr_power)
        self.sf: torch.optim.Optimizer | None = None
        #: The training weights ``y`` by parameter name while the model holds ``x``.
        self.train_weights: dict[str, torch.Tensor] | None = None
        self._named: dict[str, torch.nn.Parameter] = {}
        self._checkpointing = False

    def declare(self) -> Declaration:
        # The optimizer's mode flag moves with the weights.
        to_x = Access(reads={"model.weights"}, writes={"model.weights", "optimizer"})
        return Declaration(
            events={
                Event.AFTER_LOAD: Access(
                    reads={"optimizer", "scheduler", "model.weights"}, writes={"optimizer", "lr"}
                ),
                Event.BEFORE_DATALOADER: to_x,  # to y, with the same fields
                Event.EVAL_START: to_x,
                Event.BATCH_CHECKPOINT: to_x,
                Event.EPOCH_CHECKPOINT: to_x,
                Event.FIT_END: to_x,
            },
            # Never planned together (below); the order only keeps the plan's report to the
            # declared incompatibility instead of a second "both write" conflict.
            runs_after={"muon", "lookahead", "ema"},
            incompatible_with={
                "muon",
                "lookahead",
                "ema",
                "swa",
                "rewinding",
                "magnitude_pruning",
            },  # fmt: skip
        )

    @property
    def at_x(self) -> bool:
        """Whether the model holds the averaged weights ``x`` (the optimizer in eval mode)."""
        return self.sf is not None and not self.sf.param_groups[0]["train_mode"]

    def match(self, event: Event, state: State) -> bool:
        if event == Event.AFTER_LOAD:
            return True
        if event == Event.BEFORE_DATALOADER:
            return self.at_x
        if event in (Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT):
            return self._checkpointing and not self.at_x  # only a saver writes the weights
        return not self.at_x

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_LOAD:
            self._install(state)
        elif event == Event.BEFORE_DATALOADER:
            self._to_y()
        else:
            self._to_x()

    def _install(self, state: State) -> None:
        if state.schedulers:
            raise ConfigError(
                "algorithms.schedule_free: it replaces the LR schedule, so scheduler.name must "
                "be constant without scheduler.warmup; use algorithms.schedule_free.warmup"
            )
        base = state.optimizer
        try:
            warmup = round(state.converter.to_batches(self.warmup))
        except ValueError as err:
            raise ConfigError(f"algorithms.schedule_free.warmup: {self.warmup}: {err}") from None
        groups = []
        for group in base.param_groups:
            lr = self.lr if self.lr is not None else group["lr"]
            decay = self.weight_decay
            if decay is None:
                decay = group.get("weight_decay", 0.0)
            groups.append({"params": group["params"], "lr": lr, "weight_decay": decay})
        sf = schedule_free_optimizer(
            groups,
            self.optimizer,
            lr=self.lr,
            beta=self.beta,
            beta2=self.beta2,
            weight_decay=self.weight_decay or 0.0,
            warmup_steps=warmup,
            r=self.r,
            weight_lr_power=self.weight_lr_power,
        )
        if all("train_mode" in g for g in base.param_groups):
            # Resumed: the checkpoint's optimizer part is this optimizer's state (same groups,
            # same parameters), which the run's own optimizer was loaded with.
            sf.load_state_dict(base.state_dict())
        names = {id(p): n for n, p in state.model.named_parameters()}
        self._named = {names[id(p)]: p for g in sf.param_groups for p in g["params"]}
        if self.train_weights is not None:
            unknown = sorted(set(self.train_weights) - set(self._named))
            if unknown:
                raise ValueError(f"schedule_free: saved weights for unknown parameters {unknown}")
        self._checkpointing = any(isinstance(c, CheckpointSaver) for c in state.callbacks)
        state.optimizer = self.sf = sf

    @torch.no_grad()
    def _to_x(self) -> None:
        assert self.sf is not None
        self.train_weights = {
            n: p.detach().clone() for n, p in self._named.items() if "z" in self.sf.state[p]
        }
        self.sf.eval()

    @torch.no_grad()
    def _to_y(self) -> None:
        assert self.sf is not None
        self.sf.train()
        # train() recomputes y from x and z: equal to the y left at the switch up to rounding,
        # so the exact copy taken then is put back.
        for name, weights in (self.train_weights or {}).items():
            self._named[name].copy_(weights)
        self.train_weights = None

    def state_dict(self) -> dict:
        return {"train_weights": cpu_copies(self.train_weights)}

    def load_state_dict(self, state: dict) -> None:
        self.train_weights = from_saved(state.get("train_weights"))
        if self.train_weights is not None and self._named:
            for name, tensor in self.train_weights.items():
                self.train_weights[name] = tensor.to(self._named[name].device)
