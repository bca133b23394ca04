"""One process per output directory: an OS-level lock on a file inside it.

Two copies of the same command writing one run directory interleave their logs and delete each
other's checkpoints (``keep_last``). :class:`RunLock` makes the second one fail at once instead,
naming the PID that holds the directory::

    with RunLock("runs/quickstart-1a2b3c4d"):
        ...  # train, write files

The lock is ``fcntl.flock`` on ``<directory>/.speedup.lock``: the kernel releases it when the
holder's file descriptor closes, so a process killed with SIGKILL never leaves a stale lock
behind (the PID written in the file is only a hint for the error message). Nesting is
per-process re-entrant: a lottery experiment or a benchmark sweep may lock its directory and
call code that locks it again.

A launcher that holds the lock for its workers (``speedup run --nproc N`` execs torchrun) puts
:meth:`RunLock.child_environment` in their environment: a worker then proceeds when the lock it
finds taken is held by that launcher. Standard library only, so that it imports fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from speedup.errors import RunLockedError

__all__ = ["RunLock", "RunLockedError", "LOCK_FILE", "LAUNCHER_ENV", "main_process_lock"]

#: The lock file's name inside the locked directory.
LOCK_FILE = ".speedup.lock"
#: Environment variable through which a launcher tells its workers which directories it holds
#: (a JSON object: resolved directory -> the launcher's PID).
LAUNCHER_ENV = "SPEEDUP_LOCKS_HELD"


@dataclass
class _Held:
    """A lock this process holds: its file, how many RunLocks share it, the directories
    that taking it created (removed on release when still empty)."""

    fd: int
    depth: int = 1
    created: list[Path] = field(default_factory=list)


_HELD: dict[str, _Held] = {}  # by resolved directory
_HELD_GUARD = threading.Lock()


def _flock(fd: int) -> bool:
    """Take the exclusive lock without waiting; False if another open file holds it."""
    try:
        import fcntl
    except ImportError:  # Windows (not exercised by the tests): lock the first byte instead
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(fd: int) -> int | None:
    """The holder's PID from the lock file. A holder writes it just after locking, so an empty
    file is re-read for a moment before giving up."""
    deadline = time.monotonic() + 0.5
    while True:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 64).decode("ascii", "replace").strip()
        except OSError:  # Windows refuses reads of a locked byte
            return None
        if text.isdigit() and _alive(int(text)):
            return int(text)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    """False when no process ``pid`` exists: a PID left by a killed holder, about to be
    overwritten by the new one."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _launcher_pid(directory: str) -> int | None:
    """The PID of the launcher that holds ``directory`` for this process, if one does."""
    try:
        held = json.loads(os.environ.get(LAUNCHER_ENV, "{}"))
    except ValueError:
        return None
    pid = held.get(directory) if isinstance(held, dict) else None
    return pid if isinstance(pid, int) else None


def _make_directory(directory: Path) -> list[Path]:
    """Create ``directory`` and missing parents; returns those this call created."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # another process made it meanwhile: not ours to remove
            continue
        created.append(path)
    return created


class RunLock:
    """An exclusive, process-wide lock on ``directory`` (created if missing).

    :meth:`acquire` raises :class:`RunLockedError` at once when another process holds it.
    :meth:`release` deletes the lock file, and the directory too when the lock created it and
    nothing else was written there (a run that failed on bad input leaves no trace).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._key = ""
        self._counted = False  # shares an entry of _HELD (False: our launcher holds it)
        self._active = False

    @property
    def locked(self) -> bool:
        """True between a successful :meth:`acquire` and its :meth:`release`."""
        return self._active

    def acquire(self) -> RunLock:
        if self._active:
            raise RuntimeError(f"{self.path}: this RunLock is already held")
        self._key = os.path.realpath(self.directory)
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is not None:  # this process holds it already: nest
                held.depth += 1
                self._counted = True
            else:
                created: list[Path] = []
                fd = self._open_locked(created)
                self._counted = fd is not None
                if fd is not None:
                    _HELD[self._key] = _Held(fd, created=created)
        self._active = True
        return self

    def _open_locked(self, created: list[Path]) -> int | None:
        """Lock the file and return its descriptor (None: our launcher holds it); directories
        made on the way are appended to ``created``."""
        while True:
            created += _make_directory(self.directory)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _flock(fd):
                pid = _read_pid(fd)
                os.close(fd)
                launcher = _launcher_pid(self._key)
                if launcher is not None and launcher == pid:
                    return None
                raise RunLockedError(self.directory, pid, self.directory / LOCK_FILE)
            # A holder deletes the file when it lets go; if it did so between our open and our
            # lock, we hold a lock on a file nobody else will open: start again on the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, f"{os.getpid()}\n".encode("ascii"))
                return fd
            os.close(fd)

    def release(self) -> None:
        """Let go; the last holder in this process deletes the lock file, then closes it."""
        if not self._active:
            return
        self._active = False
        if not self._counted:
            return
        with _HELD_GUARD:
            held = _HELD[self._key]
            held.depth -= 1
            if held.depth > 0:  # a nested holder in this process still needs it
                return
            del _HELD[self._key]
            # Delete while still holding it (see _open_locked for why that is safe), then let go.
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(held.fd)
        for directory in reversed(held.created):
            try:
                directory.rmdir()  # only if empty: nothing but the lock was ever written
            except OSError:
                break

    def child_environment(self) -> dict[str, str]:
        """Environment entries that let processes launched under this lock (torchrun workers)
        run in the locked directory while this process holds it."""
        if not self._active:
            raise RuntimeError(f"{self.path}: acquire the lock before launching workers under it")
        try:
            held = json.loads(os.environ.get(LAUNCHER_ENV, "{}"))
        except ValueError:
            held = {}
        if not isinstance(held, dict):
            held = {}
        held[self._key] = os.getpid()
        return {LAUNCHER_ENV: json.dumps(held)}

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


@contextlib.contextmanager
def main_process_lock(directory: str | os.PathLike) -> Iterator[None]:
    """:class:`RunLock` on ``directory`` held by rank 0 only (the one that writes files) in a
    distributed run; if it is taken, every rank raises :class:`RunLockedError` together
    instead of waiting on a collective that rank 0 never joins."""
    from speedup import distributed

    lock = RunLock(directory) if distributed.is_main() else None
    failure: tuple[str, int | None] | None = None
    if lock is not None:
        try:
            lock.acquire()
        except RunLockedError as err:
            failure = (str(err.directory), err.pid)
    failure = distributed.broadcast_object(failure)
    if failure is not None:
        raise RunLockedError(Path(failure[0]), failure[1], Path(failure[0]) / LOCK_FILE)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
