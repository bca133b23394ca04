"""One process per run directory: RunLock, and `speedup run/bench/lottery` refusing to share one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speedup.cli import main
from speedup.lock import LAUNCHER_ENV, LOCK_FILE, RunLock, RunLockedError

fcntl = pytest.importorskip("fcntl")  # the probes below use flock (POSIX)

#: Holds a RunLock on argv[1] until killed; says so on stdout once it does.
HOLDER = (
    "import sys, time\n"
    "from speedup.lock import RunLock\n"
    "RunLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def holder(tmp_path: Path):
    """A separate process holding the lock on ``tmp_path / 'held'``; killed (SIGKILL) after."""
    directory = tmp_path / "held"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "held"
        yield directory, process
    finally:
        process.kill()
        process.wait()


def is_locked(lock_file: Path) -> bool:
    """Whether some process holds ``lock_file``. Probes with a non-blocking flock, so call it
    only once the holder is known to have it (a successful probe would briefly take it)."""
    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_second_holder_fails_at_once_naming_the_pid(holder) -> None:
    directory, process = holder
    assert (directory / LOCK_FILE).read_text().strip() == str(process.pid)
    with pytest.raises(
        RunLockedError, match=rf"in use by another speedup process: PID {process.pid} "
    ):
        RunLock(directory).acquire()
    try:
        RunLock(directory).acquire()
    except RunLockedError as err:
        assert err.pid == process.pid and err.directory == directory


def test_a_killed_holder_leaves_no_stale_lock(holder) -> None:
    directory, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (directory / LOCK_FILE).exists()  # the file stays; the kernel dropped the lock
    with RunLock(directory) as lock:
        assert lock.locked
        assert (directory / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (directory / LOCK_FILE).exists()


def test_release_removes_what_the_lock_created_if_nothing_was_written(tmp_path: Path) -> None:
    empty, used = tmp_path / "a" / "b", tmp_path / "used"
    with RunLock(empty):
        assert empty.is_dir()
    assert not (tmp_path / "a").exists()  # both levels it made, gone again
    with RunLock(used):
        (used / "result.json").write_text("{}")
    assert sorted(p.name for p in used.iterdir()) == ["result.json"]  # no lock file left


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    probe = "import sys; from speedup.lock import RunLock; RunLock(sys.argv[1]).acquire()"

    def taken_from_outside() -> bool:
        done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True)
        return done.returncode != 0 and b"RunLockedError" in done.stderr

    with RunLock(tmp_path):
        with RunLock(tmp_path):  # a driver that locks, calling code that locks again
            pass
        assert taken_from_outside()  # the inner release did not let go
    assert not taken_from_outside()


def test_a_launcher_holds_the_lock_for_its_workers(holder, monkeypatch) -> None:
    directory, process = holder
    key = os.path.realpath(directory)
    monkeypatch.setenv(LAUNCHER_ENV, json.dumps({key: process.pid + 1}))  # someone else
    with pytest.raises(RunLockedError):
        RunLock(directory).acquire()
    monkeypatch.setenv(LAUNCHER_ENV, json.dumps({key: process.pid}))  # our launcher
    with RunLock(directory) as lock:
        assert lock.locked
    assert is_locked(directory / LOCK_FILE)  # the worker's release left the launcher's lock
    assert (directory / LOCK_FILE).read_text().strip() == str(process.pid)


def test_child_environment_names_this_process(tmp_path: Path) -> None:
    with RunLock(tmp_path) as lock:
        env = lock.child_environment()
    assert json.loads(env[LAUNCHER_ENV]) == {os.path.realpath(tmp_path): os.getpid()}


@pytest.mark.parametrize(
    "command",
    [
        ["run", "quickstart", "--smoke", "run_dir={dir}"],
        ["bench", "shapes2d-named", "--smoke", "--out", "{dir}"],
        ["lottery", "quickstart", "--smoke", "--out", "{dir}"],
    ],
    ids=["run", "bench", "lottery"],
)
def test_commands_exit_2_when_their_directory_is_held(holder, capsys, command) -> None:
    directory, process = holder
    code = main([arg.replace("{dir}", str(directory)) for arg in command])
    err = capsys.readouterr().err
    assert code == 2
    assert f"PID {process.pid}" in err and "Traceback" not in err
    assert sorted(p.name for p in directory.iterdir()) == [LOCK_FILE]  # nothing written


# -- real runs ---------------------------------------------------------------------------------

RUN = ["quickstart", "--smoke", "device=cpu", "threads=1", "progress_bar=false"]


def speedup(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "speedup", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_held_by(lock_file: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until ``process`` has written its PID into ``lock_file`` (it does so right after
    taking the lock), then check that the file is indeed locked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            if lock_file.read_text().strip() == str(process.pid):
                break
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    else:
        pytest.fail(f"{lock_file} was not taken by PID {process.pid} within {timeout} s")
    assert is_locked(lock_file)


@pytest.mark.slow
def test_the_same_run_twice_exits_2_and_a_killed_run_leaves_no_stale_lock(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = speedup("run", *RUN, "max_duration=1000000ba", f"run_dir={run_dir}", cwd=tmp_path)
    try:
        wait_until_held_by(run_dir / LOCK_FILE, first)
        second = speedup("run", *RUN, "max_duration=1000000ba", f"run_dir={run_dir}", cwd=tmp_path)
        _, err = second.communicate(timeout=240)
        assert second.returncode == 2, err[-3000:]
        assert f"PID {first.pid}" in err and "Traceback" not in err
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    third = speedup(
        "run", *RUN, "max_duration=2ba", "resume=never", f"run_dir={run_dir}", cwd=tmp_path
    )
    out, err = third.communicate(timeout=240)
    assert third.returncode == 0, err[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert not (run_dir / LOCK_FILE).exists()


@pytest.mark.slow
def test_nproc_launcher_holds_the_lock_and_its_workers_run(tmp_path: Path) -> None:
    # `--nproc 2` takes the lock in the launcher and re-executes under torchrun: rank 0 must
    # not deadlock on its own launcher's lock, and a second launch must fail at once.
    args = ["run", *RUN, "--nproc", "2", "max_duration=8ba", "run_dir=two"]
    first = speedup(*args, cwd=tmp_path)
    try:
        wait_until_held_by(tmp_path / "two" / LOCK_FILE, first)
        second = speedup(*args, cwd=tmp_path)
        _, err = second.communicate(timeout=240)
        assert second.returncode == 2, err[-3000:]
        assert f"PID {first.pid}" in err and "launching" not in err
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 8
    assert not (tmp_path / "two" / LOCK_FILE).exists()


def test_the_locked_error_crosses_process_boundaries() -> None:
    """A worker process's RunLockedError reaches its parent intact (pickled by the pool)."""
    import pickle

    from speedup.errors import RunLockedError

    err = RunLockedError(Path("/runs/a"), 1234, Path("/runs/a/.speedup.lock"))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is RunLockedError and str(back) == str(err)
    assert (back.directory, back.pid, back.lock_file) == (err.directory, 1234, err.lock_file)
