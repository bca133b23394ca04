"""The Trainer: one training loop that fires the events of :mod:`speedup.event`.

Everything optional (speedups, logging, progress, checkpoints) lives in algorithms and
callbacks; the loop below only trains, evaluates and keeps time.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch

from speedup import distributed
from speedup.adapters import adapt_inputs
from speedup.algorithm import Algorithm
from speedup.callback import Callback
from speedup.callbacks import Monitor, with_default_monitors
from speedup.engine import Engine, Plan
from speedup.event import Event
from speedup.loggers import Logger, LoggerDestination
from speedup.model import Model
from speedup.optim import build_optimizer, build_scheduler
from speedup.state import State
from speedup.time import Interval, Time, TimeConverter, TimeUnit

__all__ = ["Trainer", "seed_everything", "select_device", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16", "fp16")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally make kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA (this process's GPU under torchrun), then Apple MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank())
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Trainer:
    """Trains a model with algorithms and callbacks.

    ``model`` is a plain ``nn.Module`` (its loss ``loss_fn(outputs, targets)``, cross-entropy
    when omitted), a Hugging Face model, or a speedup :class:`~speedup.models.Model`. The
    dataloaders yield ``(inputs, targets)`` tuples or dicts of tensors. ``algorithms`` are
    instances, registry names (``"label_smoothing"``) or ``{name: kwargs}``. ``metrics`` are
    torchmetrics metrics (default: accuracy for classification). See :mod:`speedup.adapters`
    and docs/own-model.md.

    ``optimizer`` is a spec (``{"name": "adamw", "lr": 1e-3}``) or a function
    ``params -> Optimizer``; it is built after the INIT event so that model surgery is seen by
    the param groups. ``scheduler`` is a schedule spec in Time (see :mod:`speedup.optim`).
    ``microbatch_size`` splits each batch for gradient accumulation. ``eval_interval`` is a
    Time (``"1ep"``, ``"100ba"``, ``"0.25dur"``); evaluation always runs at the end.
    ``callbacks`` get an :class:`~speedup.callbacks.LRMonitor` and a
    :class:`~speedup.callbacks.SpeedMonitor` in front unless they hold their own; every
    ``log_interval`` logs the training loss and the monitors' figures as one record.
    ``plan``: the :class:`~speedup.engine.Plan` already made for these algorithms
    (:func:`speedup.run.plan_config`), used as is when it fits the model's and data's kinds.
    """

    def __init__(
        self,
        model: Model | torch.nn.Module,
        train_dataloader: Any,
        max_duration: Time | str,
        *,
        eval_dataloader: Any = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        metrics: Any = None,
        optimizer: dict[str, Any] | Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: dict[str, Any] | None = None,
        algorithms: Sequence[Algorithm | str | Mapping[str, Any]] | Mapping[str, Any] = (),
        callbacks: Sequence[Callback] = (),
        loggers: Sequence[LoggerDestination] = (),
        eval_interval: Time | str = "1ep",
        log_interval: Time | str = "10ba",
        microbatch_size: int | None = None,
        precision: str = "fp32",
        device: str | torch.device = "auto",
        seed: int = 0,
        deterministic: bool = False,
        compile: bool = False,
        scale_schedule_ratio: float = 1.0,
        data_kind: str | None = None,
        tokens_per_sample: int | None = None,
        trace: bool = False,
        strategy: str = "ddp",
        fsdp_param_dtype: str | None = None,
        plan: Plan | None = None,
    ) -> None:
        # What users already have (a plain module, tuple batches, algorithm names) becomes a
        # Model, dict batches and Algorithm instances; bad input fails here, before training.
        model, train_dataloader, eval_dataloader, algorithms = adapt_inputs(
            model, train_dataloader, eval_dataloader, algorithms, loss_fn, metrics
        )
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: allowed {', '.join(PRECISIONS)}")
        seed_everything(seed, deterministic)
        device = device if isinstance(device, torch.device) else select_device(device)
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (GradScaler); use bf16 on CPU")
        if scale_schedule_ratio <= 0:
            raise ValueError(f"scale_schedule_ratio must be > 0, got {scale_schedule_ratio}")
        max_duration = Time.parse(max_duration)
        if max_duration.unit == TimeUnit.DURATION:
            raise ValueError("max_duration cannot be in dur (it defines dur)")
        max_duration = max_duration * scale_schedule_ratio
        batch_size = getattr(train_dataloader, "batch_size", None) or 1
        self.converter = TimeConverter(
            len(train_dataloader), batch_size, tokens_per_sample, max_duration
        )
        # The LR and speed monitors are on unless the caller configured their own.
        callbacks = with_default_monitors(callbacks)
        self.state = state = State(
            model=model,
            max_duration=max_duration,
            seed=seed,
            device=device,
            precision=precision,
            train_dataloader=train_dataloader,
            eval_dataloader=eval_dataloader,
            converter=self.converter,
            algorithms=list(algorithms),
            callbacks=list(callbacks),
        )
        self.logger = Logger(list(loggers))
        self.logger.state = state
        hooks: list[Callback] = [*callbacks, *loggers]
        self.engine = Engine(state, self.logger, algorithms, hooks, trace=trace)
        self.engine.compile(model_kind=getattr(model, "kind", None), data_kind=data_kind, plan=plan)
        self.microbatch_size = microbatch_size
        self.eval_interval = Interval(eval_interval, self.converter)
        self.log_interval = Interval(log_interval, self.converter)

        self.engine.run(Event.INIT)
        model = state.model  # surgery at INIT may have replaced it (NoOpModel)
        model.to(device)
        self.world_size = distributed.world_size()
        if strategy not in distributed.STRATEGIES:
            raise ValueError(f"strategy {strategy!r}: allowed {', '.join(distributed.STRATEGIES)}")
        #: The FSDP2-sharded model (its parameters become DTensors: shard before the optimizer).
        self._fsdp: Any = None
        if self.world_size > 1 and strategy == "fsdp":
            self._check_fsdp_algorithms()
            distributed.shard_fsdp(model, fsdp_param_dtype)
            self._fsdp = model
        params = [p for p in model.parameters() if p.requires_grad]
        if callable(optimizer):
            state.optimizer = optimizer(params)
        else:
            state.optimizer = build_optimizer(params, optimizer)
        if scheduler and (scheduler.get("name", "constant") != "constant" or "warmup" in scheduler):
            state.schedulers = [
                build_scheduler(state.optimizer, scheduler, state, scale_schedule_ratio)
            ]
        if precision == "fp16":
            state.scaler = torch.amp.GradScaler("cuda")
        #: What training batches go through: the model, or its DDP wrapper (gradients averaged
        #: across processes in backward); evaluation and algorithms use the model itself.
        self._forward: Callable[..., Any] = model
        self._ddp: Any = None
        if self.world_size > 1 and self._fsdp is None:
            self._forward = self._ddp = self._wrap_ddp(model, device)
        # AFTER_LOAD and compilation wait for the first fit(): a checkpoint is loaded between
        # construction and fit (load_checkpoint), and the event's contract is "after loading".
        self._loaded = False
        self._compile = compile
        self._autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self._clock: float | None = None

    def _check_fsdp_algorithms(self) -> None:
        """FSDP shards the weights: algorithms that read or write them after INIT would see
        only this process's shard, so they are refused up front."""
        from speedup.errors import ConfigError

        refused = distributed.fsdp_incompatible(self.engine.declarations())
        if refused:
            raise ConfigError(
                f"strategy fsdp shards the weights, and {', '.join(refused)} read or write them "
                "directly during training; use distributed.strategy=ddp with these algorithms"
            )

    def _wrap_ddp(self, model: Model, device: torch.device) -> Any:
        from torch.nn.parallel import DistributedDataParallel

        unused = any(d.unused_parameters for d in self.engine.declarations().values())
        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused,
        )

    def seek(self, batch: int) -> None:
        """Position a fresh trainer at step ``batch`` of its run: the schedule and the data
        order continue from there (rewinding to step k, timing a late phase of a run)."""
        conv, ts = self.converter, self.state.timestamp
        ts.batch = batch
        ts.epoch, ts.batch_in_epoch = divmod(batch, conv.batches_per_epoch)
        ts.sample = batch * conv.samples_per_batch
        ts.sample_in_epoch = ts.batch_in_epoch * conv.samples_per_batch
        ts.token = batch * conv.samples_per_batch * (conv.tokens_per_sample or 0)
        with warnings.catch_warnings():  # stepping before optimizer.step() is intended here
            warnings.simplefilter("ignore", UserWarning)
            for scheduler in self.state.schedulers:  # LambdaLR reads the timestamp: refresh
                scheduler.step()

    def save_checkpoint(self, folder: str | os.PathLike, **options: Any) -> Any:
        """Write a checkpoint of this trainer into ``folder`` (see :mod:`speedup.checkpoint`)."""
        from speedup.checkpoint import save_checkpoint

        return save_checkpoint(self, os.fspath(folder), **options)

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Resume from ``path`` (a checkpoint, a checkpoints folder or a run directory): the
        next :meth:`fit` continues exactly where the saved run was. Returns its meta.json."""
        from speedup.checkpoint import load_checkpoint

        return load_checkpoint(self, os.fspath(path))

    # -- time -------------------------------------------------------------------------------

    def _tick(self) -> None:
        """Move training wall-clock into the timestamp (eval is kept out by pausing)."""
        now = time.perf_counter()
        if self._clock is not None:
            self.state.timestamp.train_time_s += now - self._clock
        self._clock = now

    def _untimed(self, event: Event) -> None:
        """Fire ``event`` with the training clock paused (saving a checkpoint is not training)."""
        self._tick()
        self.engine.run(event)
        self._clock = time.perf_counter()

    def _done(self) -> bool:
        s = self.state
        return s.stop_requested or s.timestamp.get(s.max_duration.unit) >= s.max_duration.value

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.state.device.type, dtype=self._autocast_dtype)

    # -- data -------------------------------------------------------------------------------

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.state.device
        if device.type == "cpu":
            return batch
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    @staticmethod
    def _iterate_from(loader: Any, batch_in_epoch: int) -> Iterator[Any]:
        """An iterator positioned at ``batch_in_epoch`` (a run started or resumed mid-epoch).

        Loaders with ``start_at`` skip without loading anything; others are drained."""
        if batch_in_epoch and hasattr(loader, "start_at"):
            loader.start_at(batch_in_epoch)
            return iter(loader)
        batches = iter(loader)
        for _ in range(batch_in_epoch):
            next(batches)
        return batches

    def _microbatches(self, batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        size = self.microbatch_size
        rows = self.state.batch_size()
        if not size or size >= rows:
            yield batch
            return
        for start in range(0, rows, size):
            yield {k: v[start : start + size] for k, v in batch.items()}

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train to max_duration (or until stop_training()); returns the final eval metrics."""
        s, run = self.state, self.engine.run
        loader = s.train_dataloader
        if not self._loaded:  # once per Trainer, after any checkpoint was loaded
            self._loaded = True
            run(Event.AFTER_LOAD)
            if self._compile:
                s.model.compile()
        run(Event.FIT_START)
        s.model.train()
        self.eval_interval.start(s.timestamp)
        self.log_interval.start(s.timestamp)
        try:
            self._clock = time.perf_counter()
            while not self._done():
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(s.timestamp.epoch)
                elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
                    loader.sampler.set_epoch(s.timestamp.epoch)
                run(Event.EPOCH_START)
                batches = self._iterate_from(loader, s.timestamp.batch_in_epoch)
                while s.timestamp.batch_in_epoch < len(loader) and not self._done():
                    run(Event.BEFORE_DATALOADER)
                    s.batch = self._to_device(next(batches))
                    # Samples drawn from the data: algorithms may reshape or subsample the batch.
                    drawn = s.batch_size()
                    run(Event.AFTER_DATALOADER)
                    run(Event.BATCH_START)
                    self._train_batch(drawn)
                    run(Event.BATCH_END)
                    if self.log_interval.due(s.timestamp, at_epoch_end=False):
                        self._log_train()
                    if self.eval_interval.due(s.timestamp, at_epoch_end=False):
                        self.eval()
                    self._untimed(Event.BATCH_CHECKPOINT)
                if s.timestamp.batch_in_epoch >= len(loader):
                    s.timestamp.to_next_epoch()
                    run(Event.EPOCH_END)
                    if self.eval_interval.due(s.timestamp, at_epoch_end=True):
                        self.eval()
                    self._untimed(Event.EPOCH_CHECKPOINT)
            if s.evaluated_at != s.timestamp.batch and not s.preempted:
                self.eval()
            run(Event.FIT_END)
            # Every rank ends fit together. Besides keeping ranks in step, this makes gloo's
            # worker threads let go of the last collective's Python tensors while the
            # interpreter is still alive: released during interpreter shutdown instead, they
            # abort the process ("terminate called without an active exception").
            distributed.barrier()
        finally:
            self._clock = None
            # State and Logger name them by protocols without close(); all are Callbacks.
            for hook in cast("list[Callback]", [*s.callbacks, *self.logger.destinations]):
                hook.close()
        return dict(s.eval_metrics)

    def _train_batch(self, drawn: int) -> None:
        s, run = self.state, self.engine.run
        run(Event.BEFORE_TRAIN_BATCH)
        full_batch = s.batch
        assert full_batch is not None and s.optimizer is not None  # drawn, and built by fit()
        microbatches = list(self._microbatches(full_batch))
        total_weight = s.model.loss_weight(full_batch) if len(microbatches) > 1 else None
        batch_loss = None
        for i, microbatch in enumerate(microbatches):
            s.batch = microbatch
            # Under DDP, gradients are averaged across processes in the last backward only.
            last = i == len(microbatches) - 1
            if self._fsdp is not None:  # FSDP reduce-scatters gradients after the last only
                self._fsdp.set_requires_gradient_sync(last)
            with contextlib.nullcontext() if self._ddp is None or last else self._ddp.no_sync():
                run(Event.BEFORE_FORWARD)
                with self._autocast():
                    s.outputs = self._forward(s.batch)
                run(Event.AFTER_FORWARD)
                run(Event.BEFORE_LOSS)
                with self._autocast():
                    s.loss = s.model.loss(s.outputs, s.batch)
                run(Event.AFTER_LOSS)
                run(Event.BEFORE_BACKWARD)
                # Each microbatch loss is a mean; weighting it by its share of the batch's loss
                # elements (samples, or label tokens) makes the accumulated gradient the batch's.
                if total_weight is None:
                    scaled = s.loss
                else:
                    scaled = s.loss * (s.model.loss_weight(s.batch) / total_weight)
                (s.scaler.scale(scaled) if s.scaler else scaled).backward()
                detached = scaled.detach()
                batch_loss = detached if batch_loss is None else batch_loss + detached
                run(Event.AFTER_BACKWARD)
        s.batch = full_batch
        assert batch_loss is not None  # a batch has at least one microbatch
        s.train_metrics["loss"] = batch_loss
        if s.scaler:
            s.scaler.unscale_(s.optimizer)
        run(Event.AFTER_TRAIN_BATCH)
        if s.scaler:
            s.scaler.step(s.optimizer)
            s.scaler.update()
        else:
            s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        tokens = full_batch["input_ids"].numel() if "input_ids" in full_batch else 0
        s.timestamp.to_next_batch(drawn * self.world_size, tokens * self.world_size)
        for scheduler in s.schedulers:
            scheduler.step()
        self._tick()

    def _log_train(self) -> None:
        s = self.state
        loss = s.train_metrics["loss"].detach().float().reshape(1)
        loss = distributed.all_reduce_sum(loss.clone()) / self.world_size  # the global mean
        metrics = {"loss/train": float(loss)}
        for callback in s.callbacks:  # LR, throughput...: one record with the loss
            if isinstance(callback, Monitor):
                metrics.update(callback.train_log(s))
        self.logger.log_metrics(metrics)

    @torch.no_grad()
    def eval(self) -> dict[str, float]:
        """Evaluate on the eval dataloader with the training clock paused."""
        s, run = self.state, self.engine.run
        if s.eval_dataloader is None:
            return {}
        training = self._clock is not None
        if training:
            self._tick()
        started = time.perf_counter()
        train_batch = s.batch
        run(Event.EVAL_START)
        s.model.eval()
        totals: dict[str, list] = {}

        def forward() -> Any:
            assert s.batch is not None  # the eval batch, as the algorithms left it
            with self._autocast():
                return s.model.eval_forward(s.batch)

        for batch in s.eval_dataloader:
            s.batch = self._to_device(batch)
            run(Event.EVAL_BATCH_START)
            run(Event.EVAL_BEFORE_FORWARD)
            s.outputs = forward()
            run(Event.EVAL_AFTER_FORWARD)
            for name, (value, count) in s.model.metrics(s.outputs, s.batch).items():
                total = totals.setdefault(name, [0.0, 0])
                total[0] = total[0] + value
                total[1] += count
            run(Event.EVAL_BATCH_END)
        if self._fsdp is not None:  # sharded forwards are collective: match the longest share
            distributed.match_collective_calls(len(s.eval_dataloader), forward)
        if self.world_size > 1:  # every process evaluated its share: add up the sums
            totals = distributed.sum_metric_totals(totals, s.device)
        averages = {name: float(v) / max(float(n), 1.0) for name, (v, n) in totals.items()}
        s.eval_metrics = s.model.finalize_metrics(averages)
        self.logger.log_metrics({f"eval/{k}": v for k, v in s.eval_metrics.items()})
        run(Event.EVAL_END)
        s.model.train()
        s.batch = train_batch
        s.evaluated_at = s.timestamp.batch
        s.timestamp.eval_time_s += time.perf_counter() - started
        if training:
            self._clock = time.perf_counter()
        return dict(s.eval_metrics)
