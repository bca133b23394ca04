"""Training killed or stopped from outside, in real subprocesses, resumes to the same weights.

The workload is MNIST-1D with a 1024-1024 MLP (checkpoints of ~20 MB, so a write takes long
enough to be hit), EMA, gradual pruning with weight rewinding and microbatches, checkpointed
every 3 steps, in deterministic mode on one thread.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from speedup.checkpoint import find_latest, read_checkpoint, resolve_checkpoint

OVERRIDES = [
    "model.widths=[1024,1024]",
    "data.batch_size=100",
    "microbatch_size=50",
    "max_duration=120ba",  # 40 batches per epoch
    "eval_interval=20ba",
    "log_interval=1ba",
    "deterministic=true",
    "threads=1",
    "progress_bar=false",
    "checkpoint.interval=3ba",
    "checkpoint.keep_last=2",
    "algorithms.ema.half_life=5ba",
    "algorithms.magnitude_pruning.sparsity=0.7",
    "algorithms.magnitude_pruning.schedule=gradual",
    "algorithms.magnitude_pruning.start=20ba",
    "algorithms.magnitude_pruning.end=80ba",
    "algorithms.magnitude_pruning.every=20ba",
    "algorithms.rewinding.mode=weights",
    "algorithms.rewinding.to=10ba",
]


def launch(run_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "speedup", "run", "mnist1d-lottery-mlp", *OVERRIDES]
    return subprocess.Popen(
        [*command, f"run_dir={run_dir}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(run_dir: Path) -> subprocess.CompletedProcess:
    process = launch(run_dir)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(resolve_checkpoint(run_dir))[1]["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("reference")
    done = finish(run_dir)
    assert done.returncode == 0, done.stderr
    return final_weights(run_dir)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _training_started(run_dir: Path, launched: float) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and metrics.stat().st_mtime > launched


_SAVED = re.compile(r"ep[0-9]+-ba[0-9]+")


def _saved(run_dir: Path) -> set[str]:
    """Names of the complete checkpoints: a write becomes visible only by the atomic rename
    of its finished temporary directory."""
    try:
        return {e.name for e in os.scandir(run_dir / "checkpoints") if _SAVED.fullmatch(e.name)}
    except FileNotFoundError:
        return set()


def _writing(run_dir: Path, pid: int) -> bool:
    """Whether process ``pid`` has a checkpoint write under way: its ``.tmp-NAME-PID``
    directory (a leftover of an earlier killed process has another PID)."""
    try:
        folder = os.scandir(run_dir / "checkpoints")
    except FileNotFoundError:
        return False
    with folder:
        return any(e.name.startswith(".tmp-") and e.name.endswith(f"-{pid}") for e in folder)


def _wait_for(condition, process: subprocess.Popen, what: str, poll: float) -> None:
    """Poll ``condition`` while ``process`` runs. The deadline only stops a hung run from
    hanging the suite; no timing is asserted."""
    deadline = time.monotonic() + 600
    while not condition():
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"the run ended while waiting for {what} ({err[-2000:]})")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} in 600 s: the run looks hung")
        time.sleep(poll)


@pytest.mark.slow
def test_sigkill_at_ten_seeded_moments_then_resume_matches(reference, tmp_path: Path) -> None:
    # Moments are defined by the run's progress, not by time after launch: on a loaded
    # machine a fixed delay can land every kill before the first checkpoint is complete, so
    # that nothing is ever resumed. (Nor is metrics.jsonl a sign of training: a resumed run
    # rewrites it while starting up.)
    rng = random.Random(20261121)
    run_dir = tmp_path / "killed"
    mid_write_kills = 0
    for moment in range(10):
        saved_before = _saved(run_dir)
        process = launch(run_dir)
        if moment == 0:  # during start-up, before anything is written
            time.sleep(rng.uniform(0.2, 1.0))
        elif moment % 3 == 2:  # the moment a checkpoint write of this process is under way
            writes = lambda pid=process.pid: _writing(run_dir, pid)  # noqa: E731
            _wait_for(writes, process, "checkpoint write", 0.0005)
        else:  # some time after this process completed a checkpoint (mid-step, mid-write...)
            saves = lambda before=saved_before: _saved(run_dir) - before  # noqa: E731
            _wait_for(saves, process, "new checkpoint", 0.005)
            # Up to a few checkpoint intervals more; short enough that ten moments stay well
            # within the 120 steps on a fast machine (the run must not finish before a kill).
            time.sleep(rng.uniform(0.0, 1.0))
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"moment {moment}: the run ended before the kill ({err[-2000:]})")
        writing = _writing(run_dir, process.pid)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        assert process.returncode == -signal.SIGKILL
        # Still there after the kill: the write was cut short, not finished just before it.
        mid_write_kills += writing and _writing(run_dir, process.pid)
        latest = find_latest(run_dir / "checkpoints")  # never raises; damaged ones skipped
        if moment != 0 and moment % 3 != 2:
            assert latest is not None, f"moment {moment}: the checkpoint it saved is not found"
        if latest is not None:
            read_checkpoint(latest)  # what resume=auto picks is complete and loadable
    assert mid_write_kills >= 1  # at least one kill left a half-written checkpoint behind

    latest = find_latest(run_dir / "checkpoints")
    assert latest is not None
    done = finish(run_dir)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {latest}" in done.stderr
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_same(final_weights(run_dir), reference)


@pytest.mark.slow
def test_sigterm_checkpoints_at_batch_boundary_and_exits(reference, tmp_path: Path) -> None:
    run_dir = tmp_path / "preempted"
    process = launch(run_dir)
    launched = time.time()
    while not _training_started(run_dir, launched) and process.poll() is None:
        time.sleep(0.01)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    assert not (run_dir / "summary.json").exists()  # the run is not finished
    latest = find_latest(run_dir / "checkpoints")
    assert latest is not None
    meta, _ = read_checkpoint(latest)
    assert meta["final"] is False and 0 < meta["timestamp"]["batch"] < 120

    done = finish(run_dir)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {latest}" in done.stderr
    assert_same(final_weights(run_dir), reference)
