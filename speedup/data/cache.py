"""The on-disk cache of generated and tokenised data, and atomic file writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "default_cache_dir"]


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
