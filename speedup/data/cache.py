"""The on-disk cache of generated and tokenised data, and atomic file writes."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from speedup.checkpoint import find_os_error

__all__ = ["atomic_save", "default_cache_dir", "save_to_cache"]


def default_cache_dir() -> Path:
    """``$SPEEDUP_CACHE`` if set, else ``~/.cache/speedup``."""
    env = os.environ.get("SPEEDUP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "speedup"


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over it: a reader (or
    a crash) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_to_cache(obj: Any, path: str | os.PathLike[str]) -> bool:
    """:func:`atomic_save` into the data cache, as a convenience: the caller already holds the
    data, so a cache that cannot be written (an unwritable or read-only home, a full disk, a
    path under a file) costs only the next run's regeneration. It warns once, naming
    ``SPEEDUP_CACHE``, and returns False; True when saved."""
    try:
        atomic_save(obj, path)
    except Exception as err:
        cause = find_os_error(err)  # torch.save reports a failed write as a RuntimeError
        if cause is None:
            raise
        warnings.warn(
            f"cannot write the data cache in {Path(path).parent} "
            f"({cause.strerror or cause}): the data is kept in memory for this run only; set "
            "SPEEDUP_CACHE to a writable directory to cache it",
            stacklevel=2,
        )
        return False
    return True
