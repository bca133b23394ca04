"""Distributed data parallelism through real torchrun: two CPU processes with gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _helpers import speedup_process

from speedup.checkpoint import list_checkpoints, read_checkpoint, resolve_checkpoint
from speedup.config import load_config
from speedup.run import run_config

#: How every run here trains: on the CPU, one thread a process, quietly.
ON_CPU = ["device=cpu", "threads=1", "progress_bar=false"]
#: What makes an interrupted run resumable to the very weights: deterministic, on 2 processes.
EXACT_ON_TWO = ["deterministic=true", "--nproc", "2"]
#: An MLP on MNIST-1D (no BatchNorm, no random augmentation), so that two processes with half
#: the global batch each compute exactly the single-process gradient, up to summation order.
RUN = [
    "mnist1d-lottery-mlp",
    "--smoke",
    *ON_CPU,
    "max_duration=24ba",
    "log_interval=1ba",
    "eval_interval=8ba",
]


def processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose command line contains ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if marker in cmdline and "State:\tZ" not in status:  # zombies are already dead
            found.append(int(entry.name))
    return found


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def close_to(value: float) -> object:
    """``value`` up to the summation order in which processes add their gradients."""
    return pytest.approx(value, rel=1e-5, abs=1e-6)


def assert_logs_match(one: Path, other: Path) -> None:
    """The runs in ``one`` and ``other`` logged at the same steps the same losses and eval
    metrics (up to summation order)."""
    a, b = records(one), records(other)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            if key.startswith(("loss/", "eval/")):
                assert rb[key] == close_to(value), (ra["step"], key)


def assert_same_final_metrics(single: dict, summary: dict) -> None:
    for key, value in single["metrics"].items():
        assert summary["metrics"][key] == close_to(value)


def wait_until(ready: Callable[[], bool], seconds: float, poll: float) -> None:
    """Asks ``ready`` every ``poll`` seconds until it holds or ``seconds`` have passed."""
    deadline = time.time() + seconds
    while time.time() < deadline and not ready():
        time.sleep(poll)


def signal_each(pids: list[int], signum: signal.Signals) -> None:
    """Sends ``signum`` to each of ``pids`` that is still alive."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def run_then_start_again(
    args: list[str],
    cwd: Path,
    reference: str,
    name: str,
    checkpointed: Callable[[list[Path]], bool],
) -> subprocess.Popen:
    """Runs ``speedup run ARGS`` to the end in the run directory ``reference``, then starts
    it again in ``name`` in the background (output discarded) and returns that process once
    the checkpoints it has saved satisfy ``checkpointed``, still running."""
    done = speedup_process("run", *args, f"run_dir={reference}", cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    process = subprocess.Popen(
        [sys.executable, "-m", "speedup", "run", *args, f"run_dir={name}"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = cwd / name / "checkpoints"
    wait_until(
        lambda: process.poll() is not None or checkpointed(list_checkpoints(folder)), 120, 0.005
    )
    assert process.poll() is None, f"the run finished before it could be interrupted: {name}"
    return process


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model's tensors in the run's latest checkpoint."""
    return read_checkpoint(resolve_checkpoint(run_dir))[1]["model"]


def assert_resumes_to_the_reference(args: list[str], name: str, reference: str, cwd: Path) -> None:
    """``speedup run ARGS`` into the interrupted run directory ``name`` resumes it, and it
    ends with the very weights of the uninterrupted run in ``reference``."""
    resumed = speedup_process("run", *args, f"run_dir={name}", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    a, b = model_weights(cwd / reference), model_weights(cwd / name)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path) -> None:
    single = run_config(load_config(RUN[0], [*RUN[2:], f"run_dir={tmp_path / 'one'}"], True))
    done = speedup_process("run", *RUN, "--nproc", "2", "run_dir=two", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "launching: -m torch.distributed.run" in done.stderr
    assert done.stdout.count("run dir:") == 1  # the summary is printed by rank 0 only

    # Exactly one run directory, with one set of checkpoints and one log, written by rank 0.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    two = tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
    ]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == single["steps"] == 24
    assert summary["samples"] == single["samples"]  # global samples, not one process's

    assert_logs_match(tmp_path / "one", two)
    assert_same_final_metrics(single, summary)
    _, parts = read_checkpoint(resolve_checkpoint(two))
    assert parts["trainer"]["world_size"] == 2 and len(parts["trainer"]["rng"]) == 2


def test_batch_size_must_divide_across_processes(tmp_path: Path) -> None:
    done = speedup_process("run", *RUN, "--nproc", "3", "run_dir=x", cwd=tmp_path)
    assert done.returncode == 2
    assert "data.batch_size: 8 is the global batch and must divide evenly" in done.stderr
    assert not (tmp_path / "x").exists()


MASKS_SCRIPT = """
import json, sys
import torch
from speedup import distributed
from speedup.callback import Callback
from speedup.config import load_config
from speedup.run import build_trainer

class Gather(Callback):
    def batch_end(self, state, logger):
        if state.timestamp.batch != 6:
            return
        mine = {k: v.cpu() for k, v in state.masks.items()}
        weights = {k: v.detach().cpu() for k, v in state.model.state_dict().items()}
        masks_all = distributed.all_gather_objects(mine)
        weights_all = distributed.all_gather_objects(weights)
        same_masks = all(
            torch.equal(masks_all[0][k], other[k]) for other in masks_all for k in mine
        )
        same_weights = all(
            torch.equal(weights_all[0][k], other[k]) for other in weights_all for k in weights
        )
        if distributed.is_main():
            pruned = sum(int((~m).sum()) for m in mine.values())
            out = {"masks": len(mine), "pruned": pruned, "same_masks": same_masks,
                   "same_weights": same_weights, "world": distributed.world_size()}
            open(sys.argv[1], "w").write(json.dumps(out))

cfg = load_config("mnist1d-lottery-mlp", [
    "device=cpu", "threads=1", "progress_bar=false", "max_duration=8ba",
    "algorithms.magnitude_pruning.sparsity=0.7",
    "algorithms.magnitude_pruning.schedule=gradual",
    "algorithms.magnitude_pruning.start=2ba",
    "algorithms.magnitude_pruning.end=6ba",
    "algorithms.magnitude_pruning.every=2ba",
    "algorithms.ema.half_life=2ba",
], smoke=True)
build_trainer(cfg, extra_callbacks=[Gather()]).fit()
"""


def test_pruning_masks_are_bit_identical_across_processes(tmp_path: Path) -> None:
    script = tmp_path / "gather_masks.py"
    script.write_text(textwrap.dedent(MASKS_SCRIPT))
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*command, "--nproc-per-node=2", str(script), str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["masks"] > 0 and result["pruned"] > 0
    assert result["same_masks"] and result["same_weights"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_killed_two_process_run_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    long_run = [
        *RUN[:-3],
        "max_duration=400ba",
        "log_interval=10ba",
        "eval_interval=100ba",
        "checkpoint.interval=3ba",
        *EXACT_ON_TWO,
    ]

    def trained_past_the_start(saved: list[Path]) -> bool:
        return any(not p.name.endswith("-ba0") and not p.name.startswith("ep0-") for p in saved)

    process = run_then_start_again(
        long_run, tmp_path, "reference", "killed", trained_past_the_start
    )
    marker = "run_dir=killed"
    # torchrun starts its workers in sessions of their own: kill every process of this run,
    # as a lost machine would.
    signal_each([process.pid, *processes_with(marker)], signal.SIGKILL)
    process.wait()
    wait_until(lambda: not processes_with(marker), 30, 0.05)
    assert not processes_with(marker)

    assert_resumes_to_the_reference(long_run, "killed", "reference", tmp_path)


def test_fsdp_two_processes_match_one_and_checkpoint_plain_tensors(tmp_path: Path) -> None:
    single = run_config(load_config(RUN[0], [*RUN[2:], f"run_dir={tmp_path / 'one'}"], True))
    done = speedup_process(
        "run", *RUN, "--nproc", "2", "run_dir=fsdp", "distributed.strategy=fsdp", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_logs_match(tmp_path / "one", tmp_path / "fsdp")
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert_same_final_metrics(single, summary)
    # The checkpoint holds whole, plain tensors (gathered from the shards), keyed by name.
    sharded, one = model_weights(tmp_path / "fsdp"), model_weights(tmp_path / "one")
    assert sharded.keys() == one.keys()
    for name, tensor in sharded.items():
        assert type(tensor) is torch.Tensor and tensor.shape == one[name].shape
        assert torch.allclose(tensor, one[name], atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_fsdp_gpt2_blocks_stop_on_sigterm_and_resume_exactly(tmp_path: Path) -> None:
    gpt = [
        "stdlib-gpt",
        "--smoke",
        *ON_CPU,
        "max_duration=40ba",
        "log_interval=5ba",
        "microbatch_size=2",
        "checkpoint.interval=5ba",
        "distributed.strategy=fsdp",
        *EXACT_ON_TWO,
    ]
    process = run_then_start_again(gpt, tmp_path, "straight", "stopped", bool)
    marker = "run_dir=stopped"
    # As a cluster scheduler signals every process of a job:
    signal_each(processes_with(marker), signal.SIGTERM)
    process.wait(timeout=120)
    wait_until(lambda: not processes_with(marker), 60, 0.05)
    assert not (tmp_path / "stopped" / "summary.json").exists()  # stopped before the end
    stopped_at = read_checkpoint(resolve_checkpoint(tmp_path / "stopped"))[0]["timestamp"]
    assert 0 < stopped_at["batch"] < 40

    assert_resumes_to_the_reference(gpt, "stopped", "straight", tmp_path)


def _checkpoint_at(folder: Path, batch: int) -> Path:
    for path in list_checkpoints(folder):
        if read_checkpoint(path)[0]["timestamp"]["batch"] == batch:
            return path
    raise AssertionError(f"no checkpoint at batch {batch} in {folder}")


def test_resume_on_another_process_count_continues_the_global_position(tmp_path: Path) -> None:
    """A run checkpointed by one process continues under DDP on two with the same global
    batch: same global sample position, same result as the uninterrupted single process (the
    MLP draws no random numbers in training, so the per-process streams do not matter)."""
    keep = ["checkpoint.interval=12ba", "checkpoint.keep_last=5"]
    single = run_config(load_config(RUN[0], [*RUN[2:], *keep, f"run_dir={tmp_path / 'one'}"], True))
    halfway = _checkpoint_at(tmp_path / "one" / "checkpoints", 12)

    done = speedup_process(
        "run", *RUN, *keep, "--nproc", "2", "run_dir=two", f"resume={halfway}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert (summary["steps"], summary["samples"]) == (single["steps"], single["samples"])
    assert_same_final_metrics(single, summary)
    losses = {r["step"]: r["loss/train"] for r in records(tmp_path / "two") if "loss/train" in r}
    reference = {r["step"]: r["loss/train"] for r in records(tmp_path / "one") if "loss/train" in r}
    assert min(losses) == 13  # it continued after the checkpoint, not from the start
    for step, loss in losses.items():
        assert loss == close_to(reference[step]), step

    # FSDP does not reshard a checkpoint onto another process count: it says so, exit 2.
    done = speedup_process(
        "run", *RUN, *keep, "--nproc", "2", "run_dir=fsdp", f"resume={halfway}",
        "distributed.strategy=fsdp", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "this FSDP run has 2" in done.stderr and "--nproc 1" in done.stderr
    assert "ChildFailedError" not in done.stderr and "Traceback" not in done.stderr
