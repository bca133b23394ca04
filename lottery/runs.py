"""One training run of a lottery experiment: from given weights, with fixed masks, from a
given step, into its own directory; finished runs are never recomputed.

Every experiment in :mod:`speedup.lottery` (IMP levels, controls, pruning at initialisation,
instability copies) is a sequence of these.

A run directory is keyed by its inputs: the resolved config (less the keys that cannot change
what is trained: where it is written, how it is shown, checkpointing) and digests of its start
weights and masks, recorded in ``inputs.json``. The same call with other inputs into a used
directory is refused with a :class:`~speedup.config.ConfigError` naming what differs, never
answered with the old result (an experiment rerun with other settings and the same ``--out``
would otherwise mix old and new runs).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from speedup.callback import Callback
from speedup.checkpoint import CheckpointSaver, load_checkpoint, verified_latest
from speedup.config import NOT_TRAINING_KEYS, config_hash, with_changes
from speedup.data.cache import atomic_save
from speedup.errors import ConfigError
from speedup.loggers import JSONLLogger
from speedup.run import build_trainer, truncate_metrics

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "RunResult",
    "check_inputs",
    "config_items",
    "differences",
    "initial_weights",
    "refuse",
    "load_result",
    "tensors_digest",
    "train_run",
    "weights_path",
]

SUMMARY = "summary.json"
FINAL = "final.pt"
INPUTS = "inputs.json"


class RunResult(dict):
    """summary.json of a finished run, plus where its final weights are."""

    @property
    def final_weights(self) -> dict[str, torch.Tensor]:
        return torch.load(Path(self["run_dir"]) / FINAL, weights_only=True)


def weights_path(run_dir: Path) -> Path:
    return Path(run_dir) / FINAL


def load_result(run_dir: Path) -> RunResult | None:
    """The result of a finished run, or None (never started, or interrupted)."""
    path = Path(run_dir) / SUMMARY
    if not path.exists() or not (Path(run_dir) / FINAL).exists():
        return None
    return RunResult(json.loads(path.read_text()))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_items(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as dotted keys (``model.widths``), without the keys that cannot
    change what is trained: what identifies a run or an experiment."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_TRAINING_KEYS:
        data.pop(key, None)
    return _flatten(data)


def tensors_digest(tensors: Mapping[str, torch.Tensor] | None) -> str | None:
    """A content hash of named tensors (names, dtypes, shapes and bytes); None for None."""
    if tensors is None:
        return None
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


#: Inputs recorded as digests: a differing digest is named, not printed.
_DIGESTS = ("start weights", "masks")


def differences(there: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: <there> there, <now> now`` per differing key (a missing key reads as None),
    values compared in their JSON form."""
    there, now = (json.loads(json.dumps(dict(d), default=str)) for d in (there, now))
    changed = []
    for key in sorted(set(there) | set(now)):
        old, new = there.get(key), now.get(key)
        if old == new:
            continue
        if key in _DIGESTS and old is not None and new is not None:
            changed.append(f"{key} differ")
        else:
            shown = [json.dumps(v, default=str) for v in (old, new)]
            changed.append(f"{key}: {shown[0]} there, {shown[1]} now")
    return changed


def refuse(directory: Path, what: str, changed: list[str]) -> None:
    """Raise the ConfigError of a directory made with other settings."""
    raise ConfigError(
        f"{directory}: holds {what} made with other settings ({'; '.join(changed)}); "
        f"use another --out, or delete {directory} to recompute"
    )


def check_inputs(path: str | Path, inputs: Mapping[str, Any], what: str) -> None:
    """Record ``inputs`` (a flat JSON-able dict) in ``path`` on first use; afterwards refuse
    other inputs with a ConfigError naming each key that differs. A key on one side only
    reads as None on the other, so a setting added later with None as its default does not
    invalidate older directories."""
    path = Path(path)
    now = json.loads(json.dumps(dict(inputs), default=str))  # the form it is stored in
    if path.exists():
        changed = differences(json.loads(path.read_text()), now)
        if changed:
            refuse(path.parent, what, changed)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(now, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def initial_weights(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The model's weights at initialisation for ``cfg.seed`` (no training)."""
    trainer = build_trainer(with_changes(cfg, progress_bar=False))
    return {k: v.detach().cpu().clone() for k, v in trainer.state.model.state_dict().items()}


def train_run(
    cfg: DictConfig,
    run_dir: str | Path,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    start_batch: int = 0,
    data_seed: int | None = None,
    max_duration: str | None = None,
    stop_at_batch: int | None = None,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Train ``cfg`` in ``run_dir`` unless a finished result is already there.

    ``weights`` replace the initial weights (a rewind point); ``masks`` (parameter name -> bool)
    are held fixed, pruned weights kept at exactly zero; ``start_batch`` starts the run at that
    step of its schedule and data order (rewinding to step k); ``data_seed`` changes only the
    data order; ``stop_at_batch`` ends the run early at that step (a pretraining phase);
    ``callbacks`` are added to the run.

    The run checkpoints into ``run_dir/checkpoints`` at ``cfg.checkpoint.interval`` (newest
    only): an interrupted level resumes where it stopped, exactly, instead of starting over.
    """
    run_dir = Path(run_dir)
    changes: dict[str, Any] = {"run_dir": str(run_dir)}
    if data_seed is not None:
        changes["data_seed"] = data_seed
    if max_duration is not None:
        changes["max_duration"] = max_duration
    cfg = with_changes(cfg, progress_bar=False, **changes)
    inputs = {
        **config_items(cfg),
        "start weights": tensors_digest(weights),
        "masks": tensors_digest(masks),
        "start step": start_batch,
        "stop step": stop_at_batch,
    }
    _check_legacy(run_dir, inputs)
    check_inputs(run_dir / INPUTS, inputs, "a run")  # before reading back or resuming
    done = load_result(run_dir)
    if done is not None:
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    metrics = run_dir / "metrics.jsonl"
    folder = run_dir / "checkpoints"
    saver = CheckpointSaver(
        folder,
        interval=str(cfg.checkpoint.get("interval", "1ep")),
        keep_last=1,
        save_final=False,  # the result is final.pt; a finished level is never resumed
        config_hash=config_hash(cfg),
    )
    stops = [StopAt(stop_at_batch)] if stop_at_batch is not None else []
    trainer = build_trainer(
        cfg,
        [JSONLLogger(metrics)],
        extra_algorithms=_mask_holder(masks),
        extra_callbacks=[*stops, saver, *callbacks],
    )
    state = trainer.state
    found = verified_latest(folder)
    if found is not None:  # an interrupted level: its own weights, masks, position
        load_checkpoint(trainer, *found)
        truncate_metrics(metrics, state.timestamp.batch)
    else:
        metrics.unlink(missing_ok=True)
        if weights is not None:
            state.model.load_state_dict({k: v.to(state.device) for k, v in weights.items()})
        if start_batch:
            trainer.seek(start_batch)
    final_metrics = trainer.fit()
    if state.preempted:
        raise KeyboardInterrupt(
            f"{run_dir}: stopped by a signal after saving {saver.last_saved}; run the same "
            "command again to resume"
        )
    atomic_save({k: v.detach().cpu() for k, v in state.model.state_dict().items()}, run_dir / FINAL)
    summary = RunResult(
        run_dir=str(run_dir),
        steps=state.timestamp.batch,
        start_batch=start_batch,
        train_time_s=state.timestamp.train_time_s,
        metrics=final_metrics,
        best=_best_eval(metrics),
        density=_density(state.model, masks),
    )
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_legacy(run_dir: Path, inputs: dict[str, Any]) -> None:
    """A run directory from before inputs.json: its config.yaml is all there is to compare
    (the start weights and masks were not recorded); a match records the current inputs."""
    saved = run_dir / "config.yaml"
    if (run_dir / INPUTS).exists() or not saved.exists():
        return
    there = config_items(OmegaConf.load(saved))
    now = json.loads(json.dumps({k: v for k, v in inputs.items() if k not in _NOT_RECORDED}))
    there = json.loads(json.dumps(there, default=str))
    changed = differences(there, {k: now.get(k) for k in set(there) | set(now)})
    if changed:
        refuse(run_dir, "a run", changed)
    check_inputs(run_dir / INPUTS, inputs, "a run")


#: What config.yaml did not hold before inputs.json existed.
_NOT_RECORDED = ("start weights", "masks", "start step", "stop step")


class StopAt(Callback):
    """Ends training after step ``batch`` without changing max_duration (so the LR schedule is
    the full run's): the pretraining phase before a rewind point."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_end(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch >= self.batch:
            state.stop_training(f"reached step {self.batch}")


def _mask_holder(masks: dict[str, torch.Tensor] | None) -> list:
    if masks is None:
        return []
    from speedup.algorithm import build_algorithms

    (holder,) = build_algorithms({"magnitude_pruning": {"schedule": "fixed"}})
    holder.load_state_dict({"masks": masks})
    return [holder]


def _best_eval(metrics_path: Path) -> dict[str, float]:
    """The evaluation with the lowest eval loss: the LTH papers' early-stopping iteration."""
    best: dict[str, float] = {}
    if not metrics_path.exists():
        return best
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "eval/loss" in record and (not best or record["eval/loss"] < best["eval/loss"]):
            best = {k: v for k, v in record.items() if k.startswith("eval/") or k == "step"}
    return best


@torch.no_grad()
def _density(model: torch.nn.Module, masks: dict[str, torch.Tensor] | None) -> float:
    if not masks:
        return 1.0
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return kept / max(total, 1)
