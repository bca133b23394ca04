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

The folder may hold other data (``checkpoint.folder`` or ``run_dir`` pointed at an existing
directory): speedup deletes, renames and overwrites only what it can prove it wrote. A
checkpoint carries a format mark and its run's id in meta.json, and ``keep_last`` prunes only
checkpoints of this run; hidden temporary directories carry a mark from their first write on;
``latest`` is replaced only when it is speedup's pointer. A folder that cannot be written, or
whose ``latest`` or checkpoint-named entries are someone else's, is refused before training
(:func:`check_folder`). A write that fails (disk full) removes what it wrote at once and
raises :class:`CheckpointWriteError`, one line naming the folder and the free space.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from speedup import distributed
from speedup.callback import Callback
from speedup.errors import CheckpointError, CheckpointWriteError
from speedup.guard import refuse_nonfinite

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

__all__ = [
    "FORMAT_VERSION",
    "FORMAT",
    "CheckpointError",
    "CheckpointWriteError",
    "CheckpointSaver",
    "check_folder",
    "unwritable",
    "find_os_error",
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
#: meta.json's ``format``: what proves a directory is a checkpoint speedup wrote.
FORMAT = "speedup-checkpoint"
META = "meta.json"
LATEST = "latest"
PARTS = ("model", "optimizer", "algorithms", "trainer")
#: Written first into a checkpoint being written and removed just before it is renamed into
#: place: what proves a hidden temporary directory left by a crash is speedup's.
WRITING = ".speedup-writing"
_HIDDEN = (".tmp-", ".old-", ".latest-")
_NAME = re.compile(r"ep[0-9]+-ba[0-9]+")  # what checkpoint_name makes
_LEFTOVER = re.compile(r"\.(?:tmp|old)-ep[0-9]+-ba[0-9]+-[0-9]+")
_LATEST_TMP = re.compile(r"\.latest-[0-9]+")


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


class StateHolder(Protocol):
    """What holds a :class:`~speedup.state.State` (a Trainer): checkpoints are taken of
    ``holder.state``, so this module needs nothing else of the trainer."""

    state: State


def _state(holder: StateHolder | State) -> State:
    return getattr(holder, "state", holder)  # a Trainer, or its State


def capture(holder: StateHolder | State) -> dict[str, Any]:
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


def restore(holder: StateHolder | State, parts: dict[str, Any], where: str) -> None:
    """Put ``parts`` (from :func:`read_checkpoint`) into a freshly built trainer."""
    s = _state(holder)
    t = parts["trainer"]
    loader = t["loader"]
    conv = s.converter
    saved_world = t.get("world_size", 1)
    if saved_world != distributed.world_size() and getattr(holder, "_fsdp", None) is not None:
        raise CheckpointError(
            f"{where}: saved by a run of {saved_world} process(es), this FSDP run has "
            f"{distributed.world_size()}: resume FSDP with the same number of processes "
            f"(speedup run --nproc {saved_world}), or with distributed.strategy=ddp"
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
    # Under DDP every process holds the same model, optimizer and algorithm state, and the
    # data position is global (every process walks the same global batches), so a run may
    # resume on another number of processes with the same global batch. Only the per-process
    # random streams cannot carry over: a process with no saved stream keeps the one it was
    # seeded with at start (seed, rank), so the resumed run is deterministic but not the
    # continuation of a run with the new process count.
    saved_rng = t["rng"]
    if distributed.rank() < len(saved_rng):
        set_rng_state(saved_rng[distributed.rank()])


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


# -- what is speedup's -----------------------------------------------------------------------


def find_os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself or the nearest one among its causes (``torch.save``
    reports a failed write as a RuntimeError whose context is the OSError)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _read_meta(directory: Path) -> dict[str, Any] | None:
    """``directory/meta.json`` as a JSON object; None when missing, unreadable or not one."""
    try:
        meta = json.loads((directory / META).read_bytes())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return meta if isinstance(meta, dict) else None


def _is_speedup_meta(meta: dict[str, Any] | None) -> bool:
    """Written by speedup: the format mark, or (checkpoints from before the mark existed) an
    integer ``format_version`` beside ``speedup_version``."""
    if meta is None:
        return False
    if meta.get("format") == FORMAT:
        return True
    return type(meta.get("format_version")) is int and "speedup_version" in meta


def _is_checkpoint_dir(path: Path) -> bool:
    """A real directory (not a symlink) holding a meta.json that speedup wrote."""
    return path.is_dir() and not path.is_symlink() and _is_speedup_meta(_read_meta(path))


def _pointer(path: Path) -> str | None:
    """The checkpoint name that ``path`` names if it is a pointer as speedup writes them (a
    symlink to a bare checkpoint name, or a one-line file holding one); None otherwise."""
    try:
        if path.is_symlink():
            target = os.readlink(path)
        elif path.is_file():
            with path.open("rb") as f:
                data = f.read(65)
            if len(data) > 64:  # far longer than any name: not a pointer
                return None
            target = data.decode("ascii").removesuffix("\n").removesuffix("\r")
        else:
            return None
    except (OSError, ValueError):
        return None
    return target if _NAME.fullmatch(target) else None


def _is_own_leftover(path: Path) -> bool:
    """A hidden entry that a write cut short left behind, provably speedup's.

    Every step of a write leaves a recognisable state: a ``.tmp-NAME-PID`` directory is empty
    (just made), holds the WRITING mark (being filled) or speedup's meta.json (complete, not
    yet renamed); an ``.old-NAME-PID`` directory is a checkpoint being replaced or deleted,
    whose meta.json goes last; ``.latest-PID`` is a pointer not yet renamed over ``latest``.
    """
    if _LEFTOVER.fullmatch(path.name):
        if path.is_symlink() or not path.is_dir():
            return False
        try:
            entries = os.listdir(path)
        except OSError:
            return False
        return not entries or WRITING in entries or _is_speedup_meta(_read_meta(path))
    if _LATEST_TMP.fullmatch(path.name):
        return _pointer(path) is not None
    return False


def _delete_tree(path: Path) -> None:
    """Delete a directory of speedup's so that, cut short anywhere, what is left is still
    recognisably speedup's (see :func:`_is_own_leftover`): meta.json and the mark go last."""
    last = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name in (META, WRITING):
                last.append(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    for leftover in last:
        os.unlink(leftover)
    os.rmdir(path)


def unwritable(path: str | Path) -> str | None:
    """Why files cannot be written in directory ``path`` (made when missing), or None.

    Probes the nearest existing ancestor by creating an anonymous temporary file there, so a
    read-only mount (read-only for root too), missing permissions or a path under a regular
    file are found before training, and nothing is left behind."""
    probe = Path(path)
    while True:
        try:
            mode = probe.stat().st_mode
            break
        except (FileNotFoundError, NotADirectoryError):
            if probe.parent == probe:
                return f"{probe} does not exist"
            probe = probe.parent
        except OSError as err:
            return f"{probe}: {err.strerror or err}"
    if not stat.S_ISDIR(mode):
        return f"{probe} is a file, not a directory"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        return f"{probe}: {err.strerror or err}"
    return None


def check_folder(folder: str | Path) -> None:
    """Refuse, before training, a checkpoint folder speedup cannot use without harm: one it
    cannot write, one whose ``latest`` is not speedup's pointer, or one holding an entry named
    like a checkpoint (``ep3-ba120``) that speedup did not write (it would be replaced when the
    run reaches that step). Raises :class:`CheckpointError`, one line naming the path.

    Collective in a distributed run: rank 0 looks, and every process raises together."""
    problem = _folder_problem(Path(folder)) if distributed.is_main() else None
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise CheckpointError(problem)


def _folder_problem(folder: Path) -> str | None:
    why = unwritable(folder)
    if why is not None:
        return (
            f"checkpoint folder {folder}: cannot write there ({why}); choose a writable one "
            "with checkpoint.folder=PATH"
        )
    if not folder.is_dir():
        return None
    advice = "move it away or choose another checkpoint.folder"
    link = folder / LATEST
    if (link.exists() or link.is_symlink()) and _pointer(link) is None:
        return (
            f"{link}: exists and is not a pointer speedup wrote (a symlink to, or a one-line "
            f"file naming, one of its checkpoints); speedup keeps '{LATEST}' pointing at the "
            f"newest checkpoint and never overwrites what it did not write: {advice}"
        )
    for entry in sorted(folder.iterdir()):
        if _NAME.fullmatch(entry.name) and not _is_checkpoint_dir(entry):
            return (
                f"{entry}: named like a checkpoint but not a directory holding a meta.json "
                "speedup wrote; the run would replace it on reaching that step, and speedup "
                f"never deletes what it did not write: {advice} (or delete it, if it is a "
                "damaged checkpoint)"
            )
    return None


def _own_checkpoints(folder: Path, run_id: str | None) -> list[Path]:
    """The checkpoints of run ``run_id`` in ``folder``, oldest written first: the only ones
    ``keep_last`` may delete (named as speedup names them, meta.json with the format mark and
    this run id: never another run's, nor anything speedup did not write)."""
    own = []
    for path in folder.iterdir():
        if not _NAME.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        meta = _read_meta(path)
        if meta is not None and meta.get("format") == FORMAT and meta.get("run_id") == run_id:
            own.append((_written_at(path), path.name, path))
    return [path for *_, path in sorted(own)]


def save_checkpoint(
    trainer: StateHolder | State,
    folder: str | Path,
    *,
    config: dict[str, Any] | None = None,
    config_hash: str | None = None,
    keep_last: int = 0,
    final: bool = False,
    run_id: str | None = None,
) -> Path:
    """Write the trainer's state as ``folder/ep{E}-ba{B}`` atomically; point ``latest`` at it;
    keep only the ``keep_last`` newest checkpoints of run ``run_id`` (0 keeps all): another
    run's checkpoints, and anything speedup did not write, are never deleted. Returns the
    directory. A failed write raises :class:`CheckpointWriteError` once what it wrote is gone."""
    folder = Path(folder)
    state = _state(trainer)
    ts = state.timestamp
    name = checkpoint_name(ts.epoch, ts.batch)
    parts = capture(state)  # collective in a distributed run: every process takes part
    target = folder / name
    refuse_nonfinite(parts, ts.batch, target)  # a diverged state is never saved (collective)
    if not distributed.is_main():  # one writer; the others wait until it is in place
        distributed.barrier()
        return target
    try:
        _write_checkpoint(parts, state, folder, name, config, config_hash, keep_last, final, run_id)
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
    run_id: str | None,
) -> None:
    for part, obj in parts.items():
        _check_plain(obj, part)
    tmp = folder / f".tmp-{name}-{os.getpid()}"
    target = folder / name
    made = False  # whether tmp is this call's to remove
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if _is_own_leftover(tmp):  # an earlier failed write of this process
            _delete_tree(tmp)
        tmp.mkdir()  # refuses (FileExistsError) rather than reuse what is not ours
        made = True
        _write(tmp / WRITING, lambda f: None)  # first: from now on tmp is provably ours
        meta = _write_parts(parts, state, tmp, config, config_hash, final, run_id)
        _write(tmp / META, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
        (tmp / WRITING).unlink()
        _fsync_dir(tmp)
        if target.exists() or target.is_symlink():
            # The same step saved again (a resumed or finished run): swap it, if it is ours.
            if not _is_checkpoint_dir(target):
                raise CheckpointError(
                    f"{target}: exists and is not a checkpoint speedup wrote; it is left as it "
                    "is and this checkpoint was not saved: move it away and run again"
                )
            old = folder / f".old-{name}-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            made = False
            with contextlib.suppress(OSError):  # a leftover is removed by the next run
                _delete_tree(old)
        else:
            tmp.rename(target)
            made = False
        _fsync_dir(folder)
    except BaseException as err:
        if made:  # at once: a partial write must not keep the disk full
            shutil.rmtree(tmp, ignore_errors=True)
        cause = find_os_error(err)
        if cause is None or not isinstance(err, Exception) or isinstance(err, CheckpointError):
            raise  # not a failed write: Ctrl-C, or a refusal that already says what to do
        raise CheckpointWriteError(_write_failure(folder, name, cause)) from err
    try:
        _point_latest(folder, name)
    except OSError as err:  # the checkpoint is in place; resuming finds it without the pointer
        warnings.warn(
            f"{folder / LATEST}: not pointed at {name} ({err.strerror or err}); resuming "
            "finds the newest checkpoint without it",
            stacklevel=4,
        )
    if keep_last > 0:
        for stale in _own_checkpoints(folder, run_id)[:-keep_last]:
            _remove(stale)


def _write_parts(
    parts: dict[str, Any],
    state: State,
    tmp: Path,
    config: dict[str, Any] | None,
    config_hash: str | None,
    final: bool,
    run_id: str | None,
) -> dict[str, Any]:
    """Write each part into ``tmp``; returns the meta.json content describing them."""
    files = {}
    for part, obj in parts.items():
        path = tmp / f"{part}.pt"
        _write(path, lambda f, obj=obj: torch.save(obj, f))
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    from speedup import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "speedup_version": __version__,
        "torch_version": torch.__version__,
        "written_at": time.time(),
        "final": final,
        "timestamp": state.timestamp.state_dict(),
        "config_hash": config_hash,
        "config": config,
        "algorithms": [a.name for a in state.algorithms],
        "model_config": _model_config(state.model),
        "files": files,
    }


def _write_failure(folder: Path, name: str, err: OSError) -> str:
    """One line: where, why (the errno), the free space when the disk is full, what to do."""
    reason = f"[Errno {err.errno}] {err.strerror}" if err.errno and err.strerror else str(err)
    line = f"{folder}: cannot write checkpoint {name}: {reason}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{_size(shutil.disk_usage(folder).free)} free"
        except OSError:
            free = "free space unknown"
        line += f" ({free} once the partial write was removed)"
        advice = "make room or set checkpoint.folder to another disk"
    else:
        advice = "fix the folder or set checkpoint.folder to another one"
    return (
        f"{line}; earlier checkpoints are intact: {advice}, then run the same command again "
        "to resume"
    )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.1f} {units[0]}"


def _remove(path: Path) -> None:
    """Hide, then delete: a crash mid-delete leaves no half-deleted checkpoint in view, and
    what is left is recognisably speedup's (removed by the next run)."""
    hidden = path.with_name(f".old-{path.name}-{os.getpid()}")
    try:
        path.rename(hidden)
        _delete_tree(hidden)
    except OSError:
        return


def clean_leftovers(folder: str | Path) -> list[Path]:
    """Delete what writes that were cut short left behind: the hidden temporary and old
    directories and pointers of other processes, when provably speedup's (an entry of another
    program with a similar name stays); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if path.name.endswith(f"-{os.getpid()}") or not _is_own_leftover(path):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                _delete_tree(path)
            else:
                path.unlink()
        except OSError:
            continue
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
    """Point ``latest`` at ``name`` atomically, unless ``latest`` (or this process's temporary
    pointer) is something speedup did not write: that is left alone, with a warning, since
    resuming does not need the pointer."""
    link = folder / LATEST
    tmp = folder / f".latest-{os.getpid()}"
    for path in (link, tmp):
        if (path.exists() or path.is_symlink()) and _pointer(path) is None:
            warnings.warn(
                f"{path}: not written by speedup, so left as it is and '{LATEST}' not pointed "
                f"at {name}; resuming finds the newest checkpoint without it",
                stacklevel=5,
            )
            return
    tmp.unlink(missing_ok=True)
    try:
        try:
            tmp.symlink_to(name, target_is_directory=True)
        except OSError:  # no symlinks here (some Windows setups): a one-line file instead
            _write(tmp, lambda f: f.write(f"{name}\n".encode("ascii")))
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)  # made by this call: it was removed above
        raise
    _fsync_dir(folder)


def _latest_name(folder: Path) -> str | None:
    return _pointer(folder / LATEST)


def _written_at(path: Path) -> float:
    meta = _read_meta(path)
    value = meta.get("written_at") if meta is not None else None
    if _is_number(value) and math.isfinite(value):
        return float(value)
    try:
        return path.stat().st_mtime
    except OSError:  # deleted meanwhile by the run that owns it (keep_last)
        return float("-inf")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint directories in ``folder`` (complete or not), oldest written first: those
    named as speedup names them, and others whose meta.json speedup wrote (a directory of
    someone else's with a meta.json is not one).

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
        and (_NAME.fullmatch(p.name) or _is_speedup_meta(_read_meta(p)))
    ]
    # A training run may be deleting old ones while we look (reading while it writes).
    return [p for _, p in sorted((_written_at(p), p) for p in found) if p.exists()]


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check ``path``'s meta.json (every field of the type speedup writes) and its files
    against the sizes and SHA-256 there; return the meta.

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
    if type(version) is not int:
        raise CheckpointError(f"{path}/{META}: no format_version: not a speedup checkpoint")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} is newer than this speedup reads "
            f"({FORMAT_VERSION}); upgrade speedup"
        )
    problem = _meta_problem(meta)
    if problem is not None:
        raise CheckpointError(f"{path}/{META}: {problem}")
    for name, expected in meta["files"].items():
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


#: meta.json fields read after verification, and the JSON types speedup writes them with.
_META_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "run_id": (str, type(None)),
    "speedup_version": (str,),
    "written_at": (int, float),
    "final": (bool,),
    "timestamp": (dict,),
    "config_hash": (str, type(None)),
    "config": (dict, type(None)),
    "algorithms": (list,),
    "model_config": (dict, type(None)),
}


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """Why a parsed meta.json cannot be trusted (a field of another type than speedup writes,
    as a hand edit or another program leaves it), or None."""
    if meta.get("format", FORMAT) != FORMAT:
        return f"format is {meta['format']!r}, not {FORMAT!r}: not a speedup checkpoint"
    for key, types in _META_TYPES.items():
        if key not in meta:
            continue
        value = meta[key]
        if types == (bool,):
            fits = isinstance(value, bool)
        else:  # JSON true/false are not numbers here
            fits = isinstance(value, types) and not isinstance(value, bool)
        if not fits:
            return f"{key} is {_json_kind(value)}, not {_json_kinds(types)}"
    if "written_at" in meta and not math.isfinite(meta["written_at"]):
        return f"written_at is {meta['written_at']}, not a time"
    if not all(isinstance(a, str) for a in meta.get("algorithms", [])):
        return "algorithms holds something other than names"
    timestamp = meta.get("timestamp")
    if not isinstance(timestamp, dict) or type(timestamp.get("batch")) is not int:
        return "timestamp is not an object with an integer batch"
    files = meta.get("files")
    if not isinstance(files, dict):
        return f"files is {_json_kind(files)}, not an object"
    for name, entry in files.items():
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            return f"files names {name!r}, not a file of the checkpoint"
        if not (
            isinstance(entry, dict)
            and type(entry.get("bytes")) is int
            and isinstance(entry.get("sha256"), str)
        ):
            return f'files["{name}"] is {_json_kind(entry)}, not {{"bytes": int, "sha256": str}}'
    missing_parts = [p for p in PARTS if f"{p}.pt" not in files]
    if missing_parts:
        return f"lists no {', '.join(missing_parts)}"
    return None


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"the number {value}"
    return kinds.get(type(value), type(value).__name__)


def _json_kinds(types: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        dict: "an object",
        list: "a list",
        bool: "a boolean",
        int: "a number",
        float: "",
        type(None): "null",
    }
    return " or ".join(n for n in (names[t] for t in types) if n)


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
    trainer: StateHolder | State, path: str | Path, meta: dict[str, Any] | None = None
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

    Its state is the run's id (``run_id``, saved in every checkpoint's meta.json and restored
    on resume), so that ``keep_last`` deletes only this run's checkpoints; at fit start it
    refuses a folder it cannot use without harm (:func:`check_folder`).
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
        self.run_id = uuid.uuid4().hex[:16]  # replaced by the saved one on resume

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("run_id"), str):  # checkpoints from before run ids have none
            self.run_id = state["run_id"]

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
        from speedup.time import Interval

        self._interval = Interval(self.interval_spec, state.converter)
        self._interval.start(state.timestamp)
        self._pending = False
        check_folder(self.folder)  # before any training: refuse rather than harm
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
            run_id=self.run_id,
        )
        if self.signal_received is not None and not final:
            self._stop_if_signalled(state)  # a signal that arrived during the write
        return self.last_saved
