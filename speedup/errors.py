"""Every exception class of speedup, in one leaf module that imports nothing of the package.

Any layer can raise or catch these without loading another part of the package (the recipe
layer's YAML and OmegaConf, torch, a registry): an algorithm raising :class:`ConfigError` no
longer imports the config machinery. The modules that raise them re-export their names
(``speedup.config.ConfigError`` still works).

The CLI maps them to exit codes: input errors (config, plan, names, data paths, checkpoints,
locks) exit 2, run failures (a write that failed, a non-finite loss) exit 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "ConfigError",
    "ConformanceError",
    "DataPathError",
    "Infeasible",
    "MissingPackageError",
    "NonFiniteLossError",
    "PlanError",
    "PluginLoadError",
    "PretrainedPathError",
    "RunLockedError",
    "UnknownNameError",
]


# -- input: recipes, names, plans -------------------------------------------------------------


class ConfigError(ValueError):
    """Bad input in a recipe or override; the message names the key and its source."""


class UnknownNameError(KeyError):
    """A component name no registry knows; the message lists the choices."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class PluginLoadError(ImportError):
    """A registered plugin's module or attribute cannot be imported."""


class PlanError(ValueError):
    """The algorithms cannot be composed; the message lists every conflict (the engine's
    ``Conflict`` objects, kept in ``conflicts``)."""

    def __init__(self, conflicts: Sequence[Any]) -> None:
        self.conflicts = list(conflicts)
        lines = "\n".join(f"  - {c}" for c in self.conflicts)
        super().__init__(f"{len(self.conflicts)} composition conflict(s):\n{lines}")


class ConformanceError(AssertionError):
    """An algorithm broke its contract: an undeclared write, a state_dict that is not plain
    data or does not resume exactly, a nondeterministic run. Names the algorithm and, where
    there is one, the event (an ``Event``) and the fields."""

    def __init__(
        self,
        message: str,
        algorithm: str = "",
        event: Enum | None = None,
        fields: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.algorithm = algorithm
        self.event = event
        self.fields = list(fields)


class Infeasible(Exception):
    """The sampled configuration cannot be trained (a plan conflict or a rejected argument);
    the tuner turns it into a pruned trial."""


# -- input: files -----------------------------------------------------------------------------


class DataPathError(FileNotFoundError):
    """A configured data path does not exist. The message says what to put where."""


class PretrainedPathError(FileNotFoundError):
    """``pretrained`` names a file that does not exist."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, unsafe to load, or does not fit this run; or a
    checkpoint folder that cannot be written or holds files speedup would have to overwrite."""


class RunLockedError(RuntimeError):
    """The directory is locked by another live process (``pid``; None when unreadable).
    ``lock_file`` is the lock file that process holds."""

    def __init__(self, directory: Path, pid: int | None, lock_file: Path | None = None) -> None:
        holder = f"PID {pid}" if pid is not None else "a process whose PID could not be read"
        stop = f" (kill {pid})" if pid is not None else ""
        held = lock_file if lock_file is not None else "its lock file"
        super().__init__(
            f"{directory} is in use by another speedup process: {holder} holds "
            f"{held}; wait for it to finish or stop it{stop}, or choose "
            "another output directory"
        )
        self.directory = directory
        self.pid = pid
        self.lock_file = lock_file

    def __reduce__(self) -> tuple:  # picklable across worker processes (its own arguments)
        return (type(self), (self.directory, self.pid, self.lock_file))


class MissingPackageError(ImportError):
    """A selected logger's package is not installed; the message says what to install."""


# -- run failures -----------------------------------------------------------------------------


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions changed, an I/O error). What the
    write had made is removed and earlier checkpoints are intact; the CLI reports it in one
    line with exit code 1 (the run failed; the input was fine)."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or state; the run stopped before
    updating the weights or writing a checkpoint with it (``step``: the step concerned)."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
