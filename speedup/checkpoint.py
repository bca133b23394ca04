"""Checkpoints: one versioned directory format, written atomically, verified on load.

A checkpoint is a directory named after its time (``ep3-ba1200``) holding

- ``model.pt``, ``optimizer.pt``, ``algorithms.pt`` (every algorithm's and callback's state:
  masks, rewind snapshots, EMA weights) and ``trainer.pt`` (timestamp, schedulers, grad scaler,
  masks, RNG states, dataloader position): tensors and plain containers only, so each loads
  with ``torch.load(..., weights_only=True)``;
- ``meta.json``: format version, wall-clock time, the run's resolved config and hash, and the
  size and SHA-256 of every file.

Writes go to a hidden temporary directory that is fsynced and renamed into place, so a crash
at any moment leaves either the old set of checkpoints or the old set plus one complete new
one. ``latest`` (a symlink, or a one-line file where symlinks are unavailable) names the newest
complete one; :func:`find_latest` also checks hashes and falls back to the previous complete
checkpoint, with a warning, when the newest one is damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from speedup import distributed
from speedup.callback import Callback

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State
    from speedup.trainer import Trainer

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointSaver",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "find_latest",
    "verified_latest",
    "resolve_checkpoint",
]

FORMAT_VERSION = 1
META = "meta.json"
LATEST = "latest"
PARTS = ("model", "optimizer", "algorithms", "trainer")
_HIDDEN = (".tmp-", ".old-", ".latest-")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, unsafe to load, or does not fit this run."""


# -- plain data ------------------------------------------------------------------------------

_PLAIN_SCALARS = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)


def _check_plain(obj: Any, where: str) -> None:
    """Refuse to write what ``weights_only`` loading would refuse to read, naming where."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN_SCALARS):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where}: key {key!r} is not a str or int")
            _check_plain(value, f"{where}.{key}")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} is not a tensor or plain "
        "container (dict, list, tuple, str, number, bool, None); a state_dict() must return "
        "only those, so that checkpoints load with torch.load(weights_only=True)"
    )


# -- RNG -------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and numbers."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(words), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
        else:
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(saved)} devices, this machine has "
                f"{torch.cuda.device_count()}: CUDA randomness will differ from the original run",
                stacklevel=2,
            )


# -- what a trainer holds --------------------------------------------------------------------


def _keyed(objects: list[Any], name_of: Any) -> list[str]:
    """``name#k`` for the k-th object of that name: stable when others are added or removed."""
    seen: dict[str, int] = {}
    keys = []
    for obj in objects:
        name = name_of(obj)
        keys.append(f"{name}#{seen.get(name, 0)}")
        seen[name] = seen.get(name, 0) + 1
    return keys


def _state(holder: Trainer | State) -> State:
    return getattr(holder, "state", holder)  # a Trainer, or its State


def capture(holder: Trainer | State) -> dict[str, Any]:
    """Everything an exact resume needs, by checkpoint part."""
    s = _state(holder)
    ts, conv = s.timestamp, s.converter
    scheduler_states = []
    for scheduler in s.schedulers:
        sd = scheduler.state_dict()
        sd.pop("lr_lambdas", None)  # ours are functions of the timestamp: nothing to store
        scheduler_states.append(sd)
    algorithms = dict(zip(_keyed(s.algorithms, lambda a: a.name), s.algorithms))
    callbacks = dict(zip(_keyed(s.callbacks, lambda c: type(c).__name__), s.callbacks))
    model_state, optimizer_state = _model_and_optimizer_states(s)
    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "algorithms": {
            "algorithms": {key: a.state_dict() for key, a in algorithms.items()},
            "callbacks": {key: c.state_dict() for key, c in callbacks.items()},
        },
        "trainer": {
            "timestamp": ts.state_dict(),
            "schedulers": scheduler_states,
            "scaler": s.scaler.state_dict() if s.scaler is not None else None,
            "masks": dict(s.masks),
            "masks_updated_at": s.masks_updated_at,
            "eval_metrics": {k: float(v) for k, v in s.eval_metrics.items()},
            "evaluated_at": s.evaluated_at,
            "loader": {
                "epoch": ts.epoch,
                "batch_in_epoch": ts.batch_in_epoch,
                "batches_per_epoch": conv.batches_per_epoch,
                "samples_per_batch": conv.samples_per_batch,
            },
            # Each process's generators: process r resumes with its own stream.
            "world_size": distributed.world_size(),
            "rng": distributed.all_gather_objects(rng_state()),
        },
    }


def _sharded(model: torch.nn.Module) -> bool:
    """True when FSDP2 has sharded the model (``fully_shard`` makes it an FSDPModule; its
    parameters are DTensors, or unsharded copies between a forward and a backward)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed support
        return False
    return isinstance(model, FSDPModule)


def _full_state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _model_and_optimizer_states(s: State) -> tuple[dict[str, Any], dict[str, Any]]:
    """Plain (unsharded) states: under FSDP2 gathered whole onto rank 0 (collective), keyed
    by parameter name, so a checkpoint loads the same at any sharding or none."""
    if not _sharded(s.model):
        optimizer = s.optimizer.state_dict() if s.optimizer is not None else {}
        return s.model.state_dict(), optimizer
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = get_state_dict(s.model, s.optimizer, options=_full_state_options())
    return model, optimizer


def _load_model_and_optimizer(s: State, parts: dict[str, Any], where: str) -> None:
    if _sharded(s.model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            s.model,
            s.optimizer,
            model_state_dict=parts["model"],
            optim_state_dict=parts["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        return
    try:
        s.model.load_state_dict(parts["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{where}: model.pt does not fit this model: {err}") from None
    if s.optimizer is not None:
        try:
            s.optimizer.load_state_dict(parts["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{where}: optimizer.pt does not fit: {err}") from None


def restore(holder: Trainer | State, parts: dict[str, Any], where: str) -> None:
    """Put ``parts`` (from :func:`read_checkpoint`) into a freshly built trainer."""
    s = _state(holder)
    t = parts["trainer"]
    loader = t["loader"]
    conv = s.converter
    saved_world = t.get("world_size", 1)
    if saved_world != distributed.world_size():
        raise CheckpointError(
            f"{where}: saved by a run of {saved_world} process(es), this run has "
            f"{distributed.world_size()}: each process's data slice and random streams are in "
            f"the checkpoint, so resume with the same number (speedup run --nproc {saved_world})"
        )
    if (loader["batches_per_epoch"], loader["samples_per_batch"]) != (
        conv.batches_per_epoch,
        conv.samples_per_batch,
    ):
        raise CheckpointError(
            f"{where}: saved with {loader['batches_per_epoch']} batches of "
            f"{loader['samples_per_batch']} samples per epoch, this run has "
            f"{conv.batches_per_epoch} of {conv.samples_per_batch}: the data position cannot "
            "be resumed exactly (was data.batch_size or the dataset changed?)"
        )
    _check_names(where, "algorithms", _keyed(s.algorithms, lambda a: a.name), parts["algorithms"])
    _load_model_and_optimizer(s, parts, where)
    if len(t["schedulers"]) != len(s.schedulers):
        raise CheckpointError(
            f"{where}: {len(t['schedulers'])} LR scheduler(s) saved, this run has "
            f"{len(s.schedulers)} (was the scheduler changed?)"
        )
    for scheduler, saved in zip(s.schedulers, t["schedulers"]):
        saved = dict(saved)
        if hasattr(scheduler, "lr_lambdas"):
            saved["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
        scheduler.load_state_dict(saved)
    if s.scaler is not None and t["scaler"] is not None:
        s.scaler.load_state_dict(t["scaler"])
    s.timestamp.load_state_dict(t["timestamp"])
    s.masks = {k: v.to(s.device) for k, v in t["masks"].items()}
    s.masks_updated_at = t["masks_updated_at"]
    s.eval_metrics = dict(t["eval_metrics"])
    s.evaluated_at = t["evaluated_at"]
    for key, algorithm in zip(_keyed(s.algorithms, lambda a: a.name), s.algorithms):
        algorithm.load_state_dict(parts["algorithms"]["algorithms"][key])
    saved_callbacks = parts["algorithms"]["callbacks"]
    for key, callback in zip(_keyed(s.callbacks, lambda c: type(c).__name__), s.callbacks):
        if key in saved_callbacks:  # callbacks may be added on resume (a profiler, a logger)
            callback.load_state_dict(saved_callbacks[key])
    set_rng_state(t["rng"][distributed.rank()])


def _check_names(where: str, kind: str, current: list[str], saved: dict[str, Any]) -> None:
    saved_names = list(saved[kind])
    if saved_names != current:
        raise CheckpointError(
            f"{where}: saved with {kind} {_names(saved_names)}, this run has {_names(current)}; "
            f"resume with the same {kind} (in the same order) as the run that saved it"
        )


def _names(keys: list[str]) -> str:
    return "[" + ", ".join(k.partition("#")[0] for k in keys) + "]" if keys else "none"


# -- files -----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, write: Any) -> None:
    with path.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_name(epoch: int, batch: int) -> str:
    return f"ep{epoch}-ba{batch}"


def save_checkpoint(
    trainer: Trainer | State,
    folder: str | Path,
    *,
    config: dict[str, Any] | None = None,
    config_hash: str | None = None,
    keep_last: int = 0,
    final: bool = False,
) -> Path:
    """Write the trainer's state as ``folder/ep{E}-ba{B}`` atomically; point ``latest`` at it;
    keep only the ``keep_last`` newest checkpoints (0 keeps all). Returns the directory."""
    folder = Path(folder)
    state = _state(trainer)
    ts = state.timestamp
    name = checkpoint_name(ts.epoch, ts.batch)
    parts = capture(state)  # collective in a distributed run: every process takes part
    target = folder / name
    if not distributed.is_main():  # one writer; the others wait until it is in place
        distributed.barrier()
        return target
    try:
        _write_checkpoint(parts, state, folder, name, config, config_hash, keep_last, final)
    finally:
        distributed.barrier()
    return target


def _write_checkpoint(
    parts: dict[str, Any],
    state: State,
    folder: Path,
    name: str,
    config: dict[str, Any] | None,
    config_hash: str | None,
    keep_last: int,
    final: bool,
) -> None:
    ts = state.timestamp
    folder.mkdir(parents=True, exist_ok=True)
    for part, obj in parts.items():
        _check_plain(obj, part)
    tmp = folder / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    for part, obj in parts.items():
        path = tmp / f"{part}.pt"
        _write(path, lambda f, obj=obj: torch.save(obj, f))
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    from speedup import __version__

    meta = {
        "format_version": FORMAT_VERSION,
        "speedup_version": __version__,
        "torch_version": torch.__version__,
        "written_at": time.time(),
        "final": final,
        "timestamp": ts.state_dict(),
        "config_hash": config_hash,
        "config": config,
        "algorithms": [a.name for a in state.algorithms],
        "model_config": _model_config(state.model),
        "files": files,
    }
    _write(tmp / META, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    _fsync_dir(tmp)
    target = folder / name
    if target.exists():  # the same step saved again (a resumed or finished run): swap it
        old = folder / f".old-{name}-{os.getpid()}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    _fsync_dir(folder)
    _point_latest(folder, name)
    if keep_last > 0:
        for stale in list_checkpoints(folder)[:-keep_last]:
            _remove(stale)


def _remove(path: Path) -> None:
    """Hide, then delete: a crash mid-delete leaves no half-deleted checkpoint in view."""
    hidden = path.with_name(f".old-{path.name}-{os.getpid()}")
    try:
        path.rename(hidden)
    except OSError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def clean_leftovers(folder: str | Path) -> list[Path]:
    """Delete what writes cut short by a crash left behind (hidden temp and old dirs of
    other processes); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if path.name.startswith(_HIDDEN) and not path.name.endswith(f"-{os.getpid()}"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _model_config(model: Any) -> dict[str, Any] | None:
    """A Hugging Face network's config as JSON data (for export), else None."""
    config = getattr(getattr(model, "net", None), "config", None)
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        return None
    return json.loads(json.dumps(to_dict(), default=str))


def _point_latest(folder: Path, name: str) -> None:
    link = folder / LATEST
    tmp = folder / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(name, target_is_directory=True)
    except OSError:  # no symlinks here (some Windows setups): a one-line file instead
        tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(tmp, link)
    _fsync_dir(folder)


def _latest_name(folder: Path) -> str | None:
    link = folder / LATEST
    if link.is_symlink():
        return os.readlink(link)
    if link.is_file():
        return link.read_text(encoding="utf-8").strip() or None
    return None


def _written_at(path: Path) -> float:
    try:
        return float(json.loads((path / META).read_text(encoding="utf-8"))["written_at"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return path.stat().st_mtime
        except OSError:  # deleted meanwhile by the run that owns it (keep_last)
            return float("-inf")


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint directories in ``folder`` (complete or not), oldest written first.

    Ordered by write time, not step: after resuming from an earlier checkpoint, the new
    timeline's saves are the newest even where an abandoned one reached a later step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir()
        and not p.is_symlink()
        and not p.name.startswith(_HIDDEN)
        and (p / META).exists()
    ]
    # A training run may be deleting old ones while we look (reading while it writes).
    return [p for _, p in sorted((_written_at(p), p) for p in found) if p.exists()]


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check ``path``'s files against the sizes and SHA-256 in its meta.json; return the meta.

    Raises :class:`CheckpointError` naming the first problem."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {META} (an incomplete write?)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}/{META}: unreadable: {err}") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int):
        raise CheckpointError(f"{path}/{META}: no format_version: not a speedup checkpoint")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} is newer than this speedup reads "
            f"({FORMAT_VERSION}); upgrade speedup"
        )
    files = meta.get("files", {})
    missing_parts = [p for p in PARTS if f"{p}.pt" not in files]
    if missing_parts:
        raise CheckpointError(f"{path}/{META}: lists no {', '.join(missing_parts)}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{file}: {size} bytes, meta.json says {expected['bytes']} (truncated?)"
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: content hash does not match meta.json (corrupted)")
    return meta


def read_checkpoint(
    path: str | Path, meta: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify and load a checkpoint: ``(meta, parts)`` with every tensor on the CPU. ``meta``
    from an earlier :func:`verify_checkpoint` of ``path`` skips hashing the files again.

    Only tensors and plain containers are accepted: a file holding other pickled objects is
    refused, because unpickling them can run arbitrary code."""
    path = Path(path)
    meta = verify_checkpoint(path) if meta is None else meta
    parts = {}
    for part in PARTS:
        file = path / f"{part}.pt"
        try:
            parts[part] = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            detail = str(err).strip().splitlines()
            found = next((line for line in detail if "GLOBAL" in line), detail[0] if detail else "")
            raise CheckpointError(
                f"{file}: refused: it holds pickled Python objects, not only tensors and plain "
                f"containers ({found.strip()}). speedup never writes such files and will not "
                "load one, since unpickling can run arbitrary code; if you trust its origin, "
                "load it yourself with torch.load(weights_only=False) and save its tensors."
            ) from None
        except (RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(f"{file}: cannot be read: {err}") from None
    return meta, parts


def load_checkpoint(
    trainer: Trainer | State, path: str | Path, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Restore ``trainer`` (freshly built from the same config) from ``path``; returns meta.
    ``meta`` from :func:`verified_latest` (``path`` is then that checkpoint) skips re-hashing."""
    if meta is None:
        path = resolve_checkpoint(path)
    meta, parts = read_checkpoint(path, meta)
    restore(trainer, parts, str(path))
    return meta


def find_latest(folder: str | Path) -> Path | None:
    """The newest checkpoint in ``folder`` whose hashes check out, or None.

    Damaged ones (a truncated file, a write cut short) are skipped with a warning naming them
    and the checkpoint used instead."""
    found = verified_latest(folder)
    return found[0] if found is not None else None


def verified_latest(folder: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """:func:`find_latest`, with the meta its verification read."""
    folder = Path(folder)
    candidates = list_checkpoints(folder)
    pointed = _latest_name(folder)
    if pointed is not None:  # the pointer wins ties in write time
        candidates.sort(key=lambda p: (_written_at(p), p.name == pointed))
    skipped: list[str] = []
    for candidate in reversed(candidates):
        try:
            meta = verify_checkpoint(candidate)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        if skipped:
            warnings.warn(
                "skipped damaged checkpoint(s): "
                + "; ".join(skipped)
                + f"; resuming from the previous complete one, {candidate}",
                stacklevel=3,
            )
        return candidate, meta
    if skipped:
        warnings.warn(
            "no complete checkpoint: " + "; ".join(skipped) + "; starting from scratch",
            stacklevel=3,
        )
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, a checkpoints folder, its ``latest``, or a
    run directory (its ``checkpoints/``)."""
    path = Path(path)
    if (path / META).exists() and not path.is_symlink():
        return path
    if path.name == LATEST and path.parent.is_dir():
        path = path.parent
    for folder in (path / "checkpoints", path):
        if folder.is_dir() and (list_checkpoints(folder) or (folder / LATEST).exists()):
            found = find_latest(folder)
            if found is None:
                raise CheckpointError(f"{folder}: holds no complete checkpoint")
            return found
    raise CheckpointError(
        f"{path}: not a checkpoint (a directory with {META}), a checkpoints folder, or a run "
        "directory with checkpoints/"
    )


# -- the callback ----------------------------------------------------------------------------


class CheckpointSaver(Callback):
    """Saves checkpoints at a Time interval, at the end of training, and on SIGTERM/SIGINT.

    A checkpoint is written at a batch boundary, after that step's evaluation; at the last
    batch of an epoch it waits for the epoch's end so that resuming never replays epoch-end
    work. On SIGTERM or SIGINT (preemption, Ctrl-C) it writes a checkpoint at the next batch
    boundary, marks the run as preempted and stops it; a second Ctrl-C aborts at once.
    """

    def __init__(
        self,
        folder: str | Path,
        interval: str = "1ep",
        keep_last: int = 2,
        save_final: bool = True,
        config: dict[str, Any] | None = None,
        config_hash: str | None = None,
        handle_signals: bool = True,
    ) -> None:
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0 (0 keeps all), got {keep_last}")
        self.folder = Path(folder)
        self.interval_spec = interval
        self.keep_last = keep_last
        self.save_final = save_final
        self.config = config
        self.config_hash = config_hash
        self.handle_signals = handle_signals
        self.last_saved: Path | None = None
        self.signal_received: int | None = None
        self._interval: Any = None
        self._pending = False
        self._saved_handlers: dict[int, Any] = {}

    # -- signals ------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signal_received = signum
        name = signal.Signals(signum).name
        print(
            f"\n{name} received: saving a checkpoint at the end of this batch, then stopping"
            + (" (Ctrl-C again aborts now)" if signum == signal.SIGINT else ""),
            file=sys.stderr,
            flush=True,
        )
        if signum == signal.SIGINT:  # a second Ctrl-C gets Python's default behaviour
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _install_handlers(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._saved_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def close(self) -> None:
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)
        self._saved_handlers = {}

    # -- events -------------------------------------------------------------------------------

    def fit_start(self, state: State, logger: Logger) -> None:
        from speedup.trainer import Interval

        self._interval = Interval(self.interval_spec, state.converter)
        self._interval.start(state.timestamp)
        self._pending = False
        if distributed.is_main():
            clean_leftovers(self.folder)
        self._install_handlers()

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        due = self._interval.due(state.timestamp, at_epoch_end=False)
        stopping = self._stop_if_signalled(state)
        if not (due or stopping):
            return
        if state.timestamp.batch_in_epoch >= state.converter.batches_per_epoch:
            self._pending = True  # the epoch ends next: save after EPOCH_END
        else:
            self.save(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        due = self._interval.due(state.timestamp, at_epoch_end=True)
        stopping = self._stop_if_signalled(state)
        if due or stopping or self._pending:
            self._pending = False
            self.save(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.save_final and not state.preempted:
            self.save(state, final=True)

    def _stop_if_signalled(self, state: State) -> bool:
        if distributed.is_distributed():  # stop together: any process's signal stops all
            received = distributed.all_reduce_max(self.signal_received or 0)
            if received and self.signal_received is None:
                self.signal_received = received
        if self.signal_received is None:
            return False
        if not state.preempted:
            name = signal.Signals(self.signal_received).name
            state.stop_training(f"interrupted by {name}")
            state.preempted = True
        return True

    def save(self, state: State, final: bool = False) -> Path:
        self.last_saved = save_checkpoint(
            state,
            self.folder,
            config=self.config,
            config_hash=self.config_hash,
            keep_last=self.keep_last,
            final=final,
        )
        if self.signal_received is not None and not final:
            self._stop_if_signalled(state)  # a signal that arrived during the write
        return self.last_saved
