"""The conformance kit: does an algorithm keep the contract the engine relies on?

For plugin authors (and the built-ins' own tests)::

    from speedup.testing import check_algorithm

    def test_my_algorithm_conforms():
        report = check_algorithm(MyAlgorithm, kwargs={"alpha": 0.2})
        print(report)

:func:`check_algorithm` builds a tiny model and data the algorithm applies to (chosen from its
declaration's ``model_kinds``/``data_kinds``, or given), trains a few steps on the CPU and
checks that

* **(a) it trains:** every step runs, the loss stays finite, and the algorithm acted at least
  once (its ``match`` let some declared event through);
* **(b) it resumes:** ``state_dict()`` holds tensors and plain containers only, and a run
  resumed from a mid-run checkpoint, with fresh instances loading it, ends with exactly the
  weights and algorithm state of the uninterrupted run;
* **(c) it keeps its declaration:** the engine's check mode digests the state around every
  ``apply`` and fails when a field outside that event's ``writes`` changed;
* **(d) it is deterministic:** a second run with the same seed ends with identical weights.

A failure raises :class:`ConformanceError` (an ``AssertionError``) naming the algorithm and,
where there is one, the event and the field.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from speedup.algorithm import ALGORITHMS, Algorithm, Declaration
from speedup.callback import Callback
from speedup.checkpoint import CheckpointSaver, _check_plain, list_checkpoints
from speedup.conformance import checking_declarations
from speedup.data import DataInfo, TensorBatchLoader
from speedup.errors import CheckpointError, ConformanceError, PlanError
from speedup.model import Classifier, Model
from speedup.trainer import Trainer, seed_everything

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "WORKLOADS",
    "ConformanceError",
    "ConformanceReport",
    "Workload",
    "check_algorithm",
    "default_workload",
]


# -- workloads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A tiny model and in-memory data to check an algorithm on.

    ``model()`` builds the model (the caller seeds torch first); ``data(seed)`` returns the
    train and eval tensors. ``model_kind``/``data_kind`` are matched against declarations.
    """

    name: str
    model_kind: str
    data_kind: str
    model: Callable[[], Model]
    data: Callable[[int], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "sgd", "lr": 0.05})
    batch_size: int = 8
    tokens_per_sample: int | None = None


def _vectors(seed: int, n: int = 64, features: int = 16, classes: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g) * 2
    targets = torch.arange(n) % classes
    return {"inputs": centers[targets] + torch.randn(n, features, generator=g), "targets": targets}


def _images(seed: int, n: int = 32, size: int = 16, classes: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % classes
    inputs = torch.randn(n, 3, size, size, generator=g) * 0.5
    inputs[:, 0] += targets[:, None, None] * 0.5  # a learnable signal in the first channel
    return {"inputs": inputs, "targets": targets}


_SEQ, _VOCAB = 32, 64
_TEXT_INFO = DataInfo(kind="text", input_shape=(_SEQ,), num_classes=_VOCAB, tokens_per_sample=_SEQ)


def _tokens(seed: int, n: int, masked: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _VOCAB, (n, _SEQ), generator=g)
    ids[:, 1::2] = (ids[:, 0::2] + 1) % _VOCAB  # every other token is predictable
    if masked:  # MLM: about 15% of the positions carry a label (their own id)
        labels = torch.where(torch.rand(n, _SEQ, generator=g) < 0.15, ids, -100)
    else:  # causal LM: the model shifts the labels itself
        labels = ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _mlp() -> Model:
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    return Classifier(net, 4, kind="mlp")


def _cnn() -> Model:
    from speedup.models.vision import CifarResNet

    return Classifier(CifarResNet(1, num_classes=4, width=8), 4, kind="cnn")


def _gpt2() -> Model:
    from speedup.models.language import gpt2

    return gpt2(_TEXT_INFO, size="tiny")


def _bert() -> Model:
    from speedup.models.language import bert

    return bert(_TEXT_INFO, size="tiny")


def _text_workload(name: str, model: Callable[[], Model], masked: bool) -> Workload:
    """A tiny language model on the synthetic tokens; ``masked``: MLM labels, else causal."""
    return Workload(
        name,
        name,
        "text",
        model,
        lambda s: (_tokens(s, 32, masked), _tokens(s + 1, 16, masked)),
        {"name": "adamw", "lr": 1e-3},
        tokens_per_sample=_SEQ,
    )


#: The built-in workloads, tried in this order when none is given.
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("mlp", "mlp", "signal", _mlp, lambda s: (_vectors(s), _vectors(s + 1, 32))),
        Workload("cnn", "cnn", "image", _cnn, lambda s: (_images(s), _images(s + 1, 16))),
        _text_workload("gpt2", _gpt2, masked=False),
        _text_workload("bert", _bert, masked=True),
    )
}


def _fits(workload: Workload, declaration: Declaration) -> bool:
    models, data = declaration.model_kinds, declaration.data_kinds
    return (models is None or workload.model_kind in models) and (
        data is None or workload.data_kind in data
    )


def default_workload(*declarations: Declaration) -> Workload:
    """The first of :data:`WORKLOADS` that every declaration applies to."""
    for workload in WORKLOADS.values():
        if all(_fits(workload, d) for d in declarations):
            return workload
    wanted = "; ".join(
        f"model_kinds {_kinds(d.model_kinds)}, data_kinds {_kinds(d.data_kinds)}"
        for d in declarations
    )
    shown = ", ".join(f"{w.name} ({w.model_kind}/{w.data_kind})" for w in WORKLOADS.values())
    raise ConformanceError(
        f"no built-in workload fits {wanted}; built-in: {shown}; pass workload=Workload(...)"
    )


def _kinds(kinds: frozenset[str] | None) -> str:
    return "any" if kinds is None else ",".join(sorted(kinds))


# -- the report -------------------------------------------------------------------------------


@dataclass
class ConformanceReport:
    """What :func:`check_algorithm` ran and found (every check passed if it returned)."""

    algorithm: str
    workload: str
    steps: int
    companions: list[str]
    losses: list[float]
    #: How many times the algorithm's ``apply`` ran at each event (by event value).
    applied: dict[str, int]
    #: The step the resume check restarted from.
    resumed_at: int
    state_dict_keys: list[str]
    checks: list[str]
    seconds: float

    def __str__(self) -> str:
        applied = ", ".join(f"{e} x{n}" for e, n in self.applied.items())
        with_ = f" with {', '.join(self.companions)}" if self.companions else ""
        lines = [
            f"{self.algorithm}{with_} on {self.workload}: {self.steps} steps, "
            f"loss {self.losses[0]:.4g} -> {self.losses[-1]:.4g}, {self.seconds:.2f}s",
            f"  applied: {applied}",
            f"  state_dict keys: {', '.join(self.state_dict_keys) or '(none)'}",
        ]
        lines += [f"  ok: {check}" for check in self.checks]
        return "\n".join(lines)


# -- the check --------------------------------------------------------------------------------

AlgorithmSpec = Algorithm | type[Algorithm] | str | tuple[str | type[Algorithm], Mapping[str, Any]]


def _template(spec: Any, kwargs: Mapping[str, Any] | None = None) -> Algorithm:
    """An instance to deep-copy for every run (so every run starts from the same state)."""
    if isinstance(spec, tuple):
        spec, kwargs = spec
    if isinstance(spec, Algorithm):
        if kwargs:
            raise TypeError(f"{spec.name}: kwargs are for a class or a name, not an instance")
        return copy.deepcopy(spec)
    cls = ALGORITHMS.get(spec) if isinstance(spec, str) else spec
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"expected an Algorithm subclass, instance or registry name, got {spec!r}")
    return cls(**dict(kwargs or {}))


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.losses.append(float(state.train_metrics["loss"]))


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}


def _first_difference(a: Any, b: Any, where: str) -> str | None:
    """Where two state dicts (nested tensors and plain containers) first differ, or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return where
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
        return None if same else where
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return f"{where} (keys {sorted(map(str, set(a) ^ set(b)))})"
        for key in a:
            found = _first_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else where


def check_algorithm(
    algorithm: Algorithm | type[Algorithm] | str,
    *,
    kwargs: Mapping[str, Any] | None = None,
    workload: Workload | str | None = None,
    steps: int = 20,
    companions: Sequence[AlgorithmSpec] = (),
    seed: int = 0,
    precision: str = "fp32",
    scheduler: Mapping[str, Any] | None = None,
) -> ConformanceReport:
    """Train ``algorithm`` on a tiny workload and check the contract (see the module doc).

    ``algorithm`` is a class (built with ``kwargs``), an instance (deep-copied for each run)
    or a registry name. ``companions`` are algorithms it needs beside it (rewinding needs a
    pruner): instances, classes, names or ``(name_or_class, kwargs)`` pairs; they run in
    every run but are not themselves the subject. ``workload`` is a :class:`Workload` or a
    name in :data:`WORKLOADS`; by default the first that every declaration applies to.
    ``precision`` is the trainer's (``bf16`` runs under CPU autocast). ``scheduler`` is the
    LR schedule spec (default cosine; ``{"name": "constant"}`` for algorithms that replace it).
    Raises :class:`ConformanceError` on the first failed check; returns a report otherwise.
    """
    started = time.perf_counter()
    if steps < 4:
        raise ValueError(f"steps must be >= 4 (a resume point needs a run around it), got {steps}")
    subject = _template(algorithm, kwargs)
    others = [_template(c) for c in companions]
    name = subject.name or type(subject).__name__
    if not subject.name:
        raise ConformanceError(f"{type(subject).__name__}: set the class attribute name", name)
    try:
        declarations = [a.declare() for a in (subject, *others)]
    except (TypeError, ValueError, NotImplementedError) as err:
        raise ConformanceError(f"{name}: declare() failed: {err}", name) from err
    if isinstance(workload, str):
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}; built-in: {', '.join(WORKLOADS)}")
        workload = WORKLOADS[workload]
    chosen = workload or default_workload(*declarations)
    resume_at = steps // 2

    def run(
        check: bool, folder: Path | None = None, resume: Path | None = None
    ) -> tuple[Trainer, _Losses]:
        algorithms = [copy.deepcopy(subject), *(copy.deepcopy(o) for o in others)]
        seed_everything(seed)
        model = chosen.model()
        train, evaluation = chosen.data(seed)
        losses = _Losses()
        callbacks: list[Callback] = [losses]
        if folder is not None:
            callbacks.append(
                CheckpointSaver(
                    folder, f"{resume_at}ba", keep_last=0, save_final=False, handle_signals=False
                )
            )
        with checking_declarations(check):
            trainer = Trainer(
                model,
                TensorBatchLoader(
                    train, chosen.batch_size, shuffle=True, drop_last=True, seed=seed
                ),
                f"{steps}ba",
                eval_dataloader=TensorBatchLoader(evaluation, 2 * chosen.batch_size),
                optimizer=dict(chosen.optimizer),
                scheduler=dict(scheduler) if scheduler is not None else {"name": "cosine"},
                algorithms=algorithms,
                callbacks=callbacks,
                eval_interval=f"{resume_at}ba",
                log_interval="0ba",
                precision=precision,
                device="cpu",
                seed=seed,
                data_kind=chosen.data_kind,
                tokens_per_sample=chosen.tokens_per_sample,
                trace=True,
            )
            if resume is not None:
                trainer.load_checkpoint(resume)
            trainer.fit()
        return trainer, losses

    checks = []
    with tempfile.TemporaryDirectory(prefix="speedup-conformance-") as tmp:
        folder = Path(tmp) / "checkpoints"
        # (a) + (c): the reference run, checked against the declarations at every call.
        try:
            reference, losses = run(check=True, folder=folder)
        except PlanError as err:
            raise ConformanceError(
                f"{name} does not plan on workload {chosen.name}: {err}", name
            ) from None
        except CheckpointError as err:  # its state_dict() at the mid-run checkpoint
            raise ConformanceError(f"{name}: checkpointing failed: {err}", name) from None
        done = reference.state.timestamp.batch
        if done != steps or len(losses.losses) != steps:
            raise ConformanceError(
                f"{name}: trained {done} of {steps} steps on {chosen.name} "
                f"(stop reason: {reference.state.stop_reason or 'none'})",
                name,
            )
        bad = [i for i, loss in enumerate(losses.losses) if not math.isfinite(loss)]
        if bad:
            raise ConformanceError(
                f"{name}: the loss is not finite at step {bad[0]} ({losses.losses[bad[0]]}) "
                f"on {chosen.name}",
                name,
            )
        applied = Counter(event for event, who in reference.engine.trace if who == name)
        if not applied:
            raise ConformanceError(
                f"{name} never acted in {steps} steps on {chosen.name}: match() refused every "
                f"declared event ({', '.join(e.name for e in declarations[0].events)}); pass "
                "kwargs that make it act within the run",
                name,
            )
        checks.append(f"trained {steps} steps, loss finite, applied {sum(applied.values())} times")
        checks.append("changed only the fields it declares as written, at every event")
        final = _find(reference, name)
        state = final.state_dict()
        try:
            _check_plain(state, f"{name}.state_dict()")
        except CheckpointError as err:
            raise ConformanceError(str(err), name) from None
        # (b) resume from the mid-run checkpoint with fresh instances.
        saved = [p for p in list_checkpoints(folder) if p.name.endswith(f"-ba{resume_at}")]
        if not saved:
            found = ", ".join(p.name for p in list_checkpoints(folder)) or "none"
            raise ConformanceError(f"{name}: no checkpoint at step {resume_at} (found {found})")
        try:
            resumed, _ = run(check=False, resume=saved[0])
        except CheckpointError as err:
            raise ConformanceError(
                f"{name}: resuming from step {resume_at} failed: {err}", name
            ) from None
        where = _first_difference(_weights(reference), _weights(resumed), "weights")
        where = where or _first_difference(
            state, _find(resumed, name).state_dict(), f"{name}.state_dict()"
        )
        if where:
            raise ConformanceError(
                f"{name}: a run resumed at step {resume_at} from its state_dict differs from the "
                f"uninterrupted run at {where}: state_dict() misses state that apply() uses",
                name,
            )
        checks.append(f"state_dict is plain data; resuming at step {resume_at} is exact")
    # (d) a second run, same seed, without the checks: the same weights (checks change nothing).
    again, _ = run(check=False)
    where = _first_difference(_weights(reference), _weights(again), "weights")
    if where:
        raise ConformanceError(
            f"{name}: two runs with seed {seed} differ at {where}: draw randomness from torch's "
            "seeded generators (or a generator seeded from the state), not from the clock or "
            "an unseeded source",
            name,
        )
    checks.append(f"deterministic: two runs with seed {seed} give identical weights")
    return ConformanceReport(
        algorithm=name,
        workload=chosen.name,
        steps=steps,
        companions=[o.name for o in others],
        losses=losses.losses,
        applied=dict(applied),
        resumed_at=resume_at,
        state_dict_keys=sorted(map(str, state)),
        checks=checks,
        seconds=time.perf_counter() - started,
    )


def _find(trainer: Trainer, name: str) -> Algorithm:
    return next(a for a in trainer.state.algorithms if a.name == name)
