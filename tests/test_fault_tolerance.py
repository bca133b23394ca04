"""Training killed or stopped from outside, in real subprocesses, resumes to the same weights.

The workload is MNIST-1D with a 1024-1024 MLP (checkpoints of ~20 MB, so a write takes long
enough to be hit), EMA, gradual pruning with weight rewinding and microbatches, checkpointed
every 3 steps, in deterministic mode on one thread.
"""

from __future__ import annotations

import os
import random
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


def _writing(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    try:
        return any(entry.name.startswith(".tmp-") for entry in os.scandir(folder))
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_sigkill_at_ten_seeded_moments_then_resume_matches(reference, tmp_path: Path) -> None:
    rng = random.Random(20261121)
    run_dir = tmp_path / "killed"
    mid_write_kills = 0
    for moment in range(10):
        process = launch(run_dir)
        launched = time.time()
        if moment == 0:  # during start-up, before anything is written
            time.sleep(rng.uniform(0.2, 1.0))
        else:
            while not _training_started(run_dir, launched) and process.poll() is None:
                time.sleep(0.01)
            if moment % 3 == 2:  # the moment a checkpoint write is under way
                deadline = time.time() + 20
                while not _writing(run_dir) and process.poll() is None and time.time() < deadline:
                    time.sleep(0.0005)
            else:
                time.sleep(rng.uniform(0.0, 1.5))
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"moment {moment}: the run ended before the kill ({err[-2000:]})")
        writing = _writing(run_dir)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        assert process.returncode == -signal.SIGKILL
        mid_write_kills += (
            writing
            and (run_dir / "checkpoints").exists()
            and any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())
        )
        latest = find_latest(run_dir / "checkpoints")  # never raises; damaged ones skipped
        if latest is not None:
            read_checkpoint(latest)  # what resume=auto picks is complete and loadable
    assert mid_write_kills >= 1  # at least one kill left a half-written checkpoint behind

    done = finish(run_dir)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
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
