"""Running torchrun for ``speedup run --nproc N``, with its failure report cut to one line.

When a worker fails, torchrun's elastic agent stops the others, logs each stop and raises
``ChildFailedError``: about forty lines (a traceback and a box per process) that bury the
worker's own one-line error. This module runs the launcher, passes every worker line through
as it comes, and replaces the launcher's report by one line naming the process that failed
first and its exit code, which becomes the command's exit code (2 for bad input, as without
``--nproc``).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterable
from typing import TextIO

__all__ = ["run_launcher", "summarise_launcher_output"]

#: The elastic agent's own log lines ("E1203 18:58:12.123 4242 torch/distributed/elastic/...").
_AGENT_LOG = re.compile(r"^[IWEF]\d{4} \S+ \d+ \S*torch/distributed/elastic/")
_ROOT_CAUSE = re.compile(
    r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.DOTALL | re.IGNORECASE
)


def summarise_launcher_output(lines: Iterable[str], out: TextIO) -> int | None:
    """Copy ``lines`` to ``out`` except the launcher's failure report; return the first
    failed process's exit code (a signal as 128 + its number), or None if none failed."""
    block: list[str] = []  # a traceback in progress: a worker's (kept) or the launcher's
    blocks: list[list[str]] = []
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            block = [line]
            blocks.append(block)
        elif block:
            block.append(line)
        elif not _AGENT_LOG.match(line):
            out.write(line)
            out.flush()
    code = None
    for lines_of_block in blocks:
        text = "".join(lines_of_block)
        if "ChildFailedError" not in text:  # a worker's own traceback (--debug): keep it
            out.write(text)
            continue
        found = _ROOT_CAUSE.search(text)
        if found:
            rank, exit_code = int(found.group(1)), int(found.group(2))
            how = f"exit code {exit_code}"
            if exit_code < 0:
                how = f"signal {signal.Signals(-exit_code).name}"
                exit_code = 128 - exit_code
            out.write(f"error: process {rank} failed ({how}); torchrun stopped the others\n")
            code = exit_code
    return code


def run_launcher(command: list[str], env: dict[str, str]) -> int:
    """Run ``command`` (torchrun), its standard error filtered through
    :func:`summarise_launcher_output`; return the exit code to report."""
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    assert process.stderr is not None
    failed = summarise_launcher_output(process.stderr, sys.stderr)
    returncode = process.wait()
    if returncode == 0:
        return 0
    return failed if failed is not None else returncode
