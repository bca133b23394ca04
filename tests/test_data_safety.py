"""Never lose data: what speedup deletes, renames or overwrites is only what it wrote, places
it cannot write fail before training in one line, and a full disk costs only the checkpoint
being written (issue 15, rows 1, 6 and 7).

Tests run as root here, where ``chmod`` does not stop writes: a read-only place is a path
under a regular file, or a read-only tmpfs mounted in a private user and mount namespace
(``unshare -rm``) where the machine allows it; a full disk is a small tmpfs there, or, in
process, a file whose ``write`` raises ``OSError(ENOSPC)`` as the kernel's would.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from speedup.callback import Callback
from speedup.checkpoint import (
    FORMAT,
    WRITING,
    CheckpointError,
    CheckpointWriteError,
    check_folder,
    clean_leftovers,
    find_latest,
    list_checkpoints,
    unwritable,
    verified_latest,
    verify_checkpoint,
)
from speedup.cli import main
from speedup.config import load_config
from speedup.run import run_config

if TYPE_CHECKING:
    from speedup.loggers import Logger
    from speedup.state import State

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["progress_bar=false", "threads=1", "checkpoint.interval=1ba"]


def quick(run_dir: Path, *extra: str):
    """The quickstart's smoke run (a 1-D CNN on MNIST-1D, 4 steps), checkpointing every step."""
    return load_config("quickstart", [*QUICK, f"run_dir={run_dir}", *extra], smoke=True)


def cli(run_dir: Path, *extra: str) -> list[str]:
    return ["run", "quickstart", "--smoke", *QUICK, f"run_dir={run_dir}", *extra]


def tree(root: Path) -> dict[str, str | bytes]:
    """Every entry under ``root`` (symlinks not followed): a file's bytes, a symlink's target,
    ``dir`` for a directory. Equal trees are equal byte for byte."""
    found: dict[str, str | bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = path.read_bytes()
    return found


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- row 1: only what speedup wrote is deleted, renamed or overwritten ------------------------


def plant_foreign(folder: Path) -> None:
    """Someone else's data under every name speedup's cleanup and pruning look at."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        # a directory with a meta.json: keep_last must not take it for a checkpoint
        "results/meta.json": b'{"experiment": "mine", "format_version": 3}',
        "results/weights.bin": os.urandom(512),
        "notes/meta.json": b"not json at all",
        "hf-model/meta.json": b'{"format": "something-else", "format_version": 1}',
        # names the leftover cleanup used to delete by prefix
        ".tmp-x/data.txt": b"temporary? no: mine",
        ".old-x/data.txt": b"old, and mine",
        ".latest-x": b"mine too",
        # the same, shaped exactly like speedup's own leftovers, but not written by it
        ".tmp-ep0-ba1-1/data.txt": b"looks like a leftover",
        ".old-ep0-ba2-1/meta.json": b'{"format_version": 1}',
        ".latest-1": b"keep me\n",
        # plain files with checkpoint file names
        "meta.json": b'{"mine": true}',
        "model.pt": os.urandom(256),
    }
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (folder / ".latest-2").symlink_to("/etc")  # a pointer, but not to a checkpoint name


def plant_own_leftovers(folder: Path, meta: bytes) -> list[str]:
    """What speedup's own writes cut short by SIGKILL leave (other PIDs): to be cleaned up."""
    tmp = folder / ".tmp-ep0-ba3-999999"  # being filled
    tmp.mkdir()
    (tmp / WRITING).write_bytes(b"")
    (tmp / "model.pt").write_bytes(b"partial")
    (folder / ".tmp-ep0-ba1-999998").mkdir()  # just made
    old = folder / ".old-ep0-ba2-999997"  # a checkpoint of speedup's, being deleted
    old.mkdir()
    (old / "meta.json").write_bytes(meta)
    (old / "trainer.pt").write_bytes(b"x")
    (folder / ".latest-999996").symlink_to("ep0-ba1")
    return [".tmp-ep0-ba3-999999", ".tmp-ep0-ba1-999998", ".old-ep0-ba2-999997", ".latest-999996"]


def test_foreign_entries_survive_keep_last_and_cleanup_byte_for_byte(tmp_path: Path) -> None:
    # checkpoint.folder pointed at a directory that already holds other data
    folder = tmp_path / "my-data"
    plant_foreign(folder)
    before = tree(folder)
    cfg = quick(tmp_path / "run", f"checkpoint.folder={folder}", "checkpoint.keep_last=1")
    first = run_config(cfg)  # 4 saves, each pruning the one before
    assert first["steps"] == 4
    ours = [p.name for p in list_checkpoints(folder)]
    assert ours == ["ep0-ba4"]  # pruned to keep_last=1, and nothing else was taken for one
    meta = verify_checkpoint(folder / "ep0-ba4")
    assert meta["format"] == FORMAT and isinstance(meta["run_id"], str)

    # A run killed mid-write leaves leftovers of speedup's own: the next run removes those
    # (and only those) before training; it resumes, saves again and prunes again.
    own = plant_own_leftovers(folder, (folder / "ep0-ba4" / "meta.json").read_bytes())
    resumed = run_config(
        quick(
            tmp_path / "run",
            f"checkpoint.folder={folder}",
            "checkpoint.keep_last=1",
            "max_duration=6ba",
        )
    )
    assert resumed["resumed_from"] == str(folder / "ep0-ba4") and resumed["steps"] == 6
    after = tree(folder)
    for name, content in before.items():
        assert after.get(name) == content, name  # every planted entry, byte for byte
    assert not [name for name in own if (folder / name).exists() or (folder / name).is_symlink()]
    added = {name.split("/")[0] for name in set(after) - set(before)}
    assert added == {"ep0-ba6", "latest"}
    assert os.readlink(folder / "latest") == "ep0-ba6"
    # The resumed run continued the first one's id, so it pruned the first run's checkpoint.
    assert verify_checkpoint(folder / "ep0-ba6")["run_id"] == meta["run_id"]


def test_keep_last_leaves_another_runs_checkpoints(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    run_config(quick(tmp_path / "a", f"checkpoint.folder={folder}", "checkpoint.keep_last=1"))
    theirs = tree(folder / "ep0-ba4")
    # A fresh run (resume=never) in the same folder is another run: its pruning spares them.
    run_config(
        quick(
            tmp_path / "b",
            f"checkpoint.folder={folder}",
            "checkpoint.keep_last=1",
            "max_duration=3ba",
            "resume=never",
        )
    )
    names = sorted(p.name for p in list_checkpoints(folder))
    assert names == ["ep0-ba3", "ep0-ba4"]
    assert tree(folder / "ep0-ba4") == theirs
    ids = {verify_checkpoint(folder / n)["run_id"] for n in names}
    assert len(ids) == 2


def make_latest_file(folder: Path) -> None:
    (folder / "latest").write_bytes(b"my own notes, not a pointer\n")


def make_latest_dir(folder: Path) -> None:
    (folder / "latest").mkdir()
    (folder / "latest" / "meta.json").write_bytes(b'{"format_version": 1}')
    (folder / "latest" / "results.csv").write_bytes(b"a,b\n1,2\n")


def make_latest_link_elsewhere(folder: Path) -> None:
    (folder / "latest").symlink_to(folder.parent / "elsewhere", target_is_directory=True)


def make_empty_latest(folder: Path) -> None:
    (folder / "latest").write_bytes(b"")


def make_checkpoint_named_dir(folder: Path) -> None:
    (folder / "ep0-ba2").mkdir()
    (folder / "ep0-ba2" / "mine.txt").write_bytes(b"not a checkpoint")


@pytest.mark.parametrize(
    ("plant", "named"),
    [
        (make_latest_file, "latest"),
        (make_latest_dir, "latest"),
        (make_latest_link_elsewhere, "latest"),
        (make_empty_latest, "latest"),
        (make_checkpoint_named_dir, "ep0-ba2"),
    ],
)
def test_entries_speedup_would_overwrite_are_refused_before_training(
    tmp_path: Path, capsys, plant, named: str
) -> None:
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    plant_foreign(folder)
    plant(folder)
    before = tree(run_dir)
    assert main(cli(run_dir, "checkpoint.keep_last=1")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{folder / named}: " in line and "checkpoint.folder" in line
    assert tree(run_dir) == before  # nothing written (no metrics: nothing trained), nothing lost


# -- row 6: unwritable places fail before training; a full disk costs one checkpoint -----------


def test_unwritable_reports_why(tmp_path: Path) -> None:
    assert unwritable(tmp_path / "new" / "deeper") is None  # its nearest ancestor is writable
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    assert unwritable(blocker / "sub" / "dir") == f"{blocker} is a file, not a directory"
    assert unwritable(blocker) == f"{blocker} is a file, not a directory"
    with pytest.raises(CheckpointError, match=f"checkpoint folder {blocker / 'ck'}: cannot"):
        check_folder(blocker / "ck")


@pytest.mark.parametrize("key", ["checkpoint.folder", "run_dir"])
def test_unwritable_place_fails_before_training_in_one_line(
    tmp_path: Path, capsys, key: str
) -> None:
    blocker = tmp_path / "a-file"  # under a regular file nothing can be written, even as root
    blocker.write_bytes(b"data")
    place = blocker / "out"
    run_dir = place if key == "run_dir" else tmp_path / "run"
    extra = [f"checkpoint.folder={place}"] if key == "checkpoint.folder" else []
    assert main(cli(run_dir, *extra)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(place) in line and key in line and "is a file, not a directory" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
    assert blocker.read_bytes() == b"data"


class FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written, as the kernel's
    write(2) does on a full disk (a real file underneath receives what fits)."""

    def __init__(self, file: io.BufferedWriter, room: int) -> None:
        self._file, self._room = file, room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name: str):  # noqa: ANN204 - flush, fileno, close, ...
        return getattr(self._file, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def fill_disk_at(monkeypatch, step_name: str, room: int = 4096) -> None:
    """Files written into the temporary directory of checkpoint ``step_name`` hit a full disk."""
    real_open = Path.open

    def open_(self: Path, mode: str = "r", *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        file = real_open(self, mode, *args, **kwargs)
        if "w" in mode and self.parent.name.startswith(f".tmp-{step_name}-"):
            return FullDisk(file, room)
        return file

    monkeypatch.setattr(Path, "open", open_)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    fill_disk_at(monkeypatch, "ep0-ba4")  # step 2 is saved, step 4 (the final save) fails
    assert main(cli(run_dir, "checkpoint.keep_last=1", "checkpoint.interval=2ba")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {folder}: cannot write checkpoint ep0-ba4: [Errno 28] No space")
    assert "earlier checkpoints are intact" in line
    # The free space of the folder's disk, as it was once the partial write was removed (this
    # machine's disk is shared: others may have written a little since).
    reported = re.search(r"\(([0-9.]+) (bytes|KiB|MiB|GiB|TiB) free once the partial write", line)
    assert reported is not None, line
    scale = {"bytes": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
    free = float(reported[1]) * scale[reported[2]]
    assert abs(free - shutil.disk_usage(folder).free) < 0.02 * free + scale[reported[2]] / 10
    assert sorted(os.listdir(folder)) == ["ep0-ba2", "latest"]  # no partial write left
    assert os.readlink(folder / "latest") == "ep0-ba2"
    assert verify_checkpoint(folder / "ep0-ba2")["timestamp"]["batch"] == 2
    assert not (run_dir / "summary.json").exists()
    monkeypatch.undo()  # room again: the same command resumes from step 2
    assert main(cli(run_dir, "checkpoint.keep_last=1", "checkpoint.interval=2ba")) == 0
    assert find_latest(folder) == folder / "ep0-ba4"


def test_disk_full_in_python_raises_checkpoint_write_error(tmp_path: Path, monkeypatch) -> None:
    fill_disk_at(monkeypatch, "ep0-ba1", room=0)
    with pytest.raises(CheckpointWriteError, match=r"ep0-ba1: \[Errno 28\]") as caught:
        run_config(quick(tmp_path / "run"))
    assert isinstance(caught.value.__cause__, (OSError, RuntimeError))  # kept for debugging
    assert os.listdir(tmp_path / "run" / "checkpoints") == []


def test_unwritable_cache_falls_back_to_memory_with_one_warning(
    tmp_path: Path, monkeypatch
) -> None:
    from speedup.data.mnist1d import generate_mnist1d, load_mnist1d

    blocker = tmp_path / "home-is-a-file"
    blocker.write_bytes(b"")
    monkeypatch.delenv("SPEEDUP_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(blocker / "home"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, test = load_mnist1d(num_train=60, num_test=20, seed=11)
    messages = [str(w.message) for w in caught if "cache" in str(w.message)]
    assert len(messages) == 1 and "SPEEDUP_CACHE" in messages[0], messages
    assert str(blocker) in messages[0]
    expected = generate_mnist1d(80, seed=11)  # the data itself, as if it had been cached
    assert torch.equal(train["inputs"], expected["inputs"][:60])
    assert torch.equal(test["targets"], expected["targets"][60:])


def test_full_cache_disk_removes_its_temp_file(tmp_path: Path, monkeypatch) -> None:
    from speedup.data import cache

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), 100))
    with pytest.warns(UserWarning, match=r"No space left on device.*SPEEDUP_CACHE"):
        assert cache.save_to_cache({"x": torch.zeros(1000)}, tmp_path / "c" / "x.pt") is False
    assert os.listdir(tmp_path / "c") == []  # no partial temp file keeps the disk full
    monkeypatch.undo()
    assert cache.save_to_cache({"x": torch.zeros(3)}, tmp_path / "c" / "x.pt") is True
    assert torch.equal(torch.load(tmp_path / "c" / "x.pt")["x"], torch.zeros(3))


# -- real processes, real read-only and full file systems ------------------------------------


@functools.cache
def can_mount_privately() -> bool:
    """Whether an unprivileged user and mount namespace may mount a tmpfs here."""
    if shutil.which("unshare") is None:
        return False
    probe = 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, timeout=30)
    return done.returncode == 0


def on_tmpfs(mount: Path, options: str, script: str, **env: str) -> subprocess.CompletedProcess:
    """Run shell ``script`` with a fresh tmpfs (``options``) mounted at ``mount``, visible to
    that script only; ``$PY`` is this Python."""
    mount.mkdir(parents=True, exist_ok=True)
    command = f'mount -t tmpfs -o {options} tmpfs "{mount}" && {script}'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PY": sys.executable, **env},
    )


SPEEDUP = '"$PY" -m speedup run quickstart --smoke progress_bar=false threads=1'


@pytest.mark.slow  # a fresh interpreter importing torch: ~25 s on the shared 2-core box
@pytest.mark.parametrize("key", ["checkpoint.folder", "run_dir"])
def test_read_only_mount_fails_before_training(tmp_path: Path, key: str) -> None:
    mount = tmp_path / "ro"
    place = mount / "out"
    run_dir = place if key == "run_dir" else tmp_path / "run"
    args = f"run_dir={run_dir}" + (f" checkpoint.folder={place}" if key != "run_dir" else "")
    if can_mount_privately():  # read-only for root too
        done = on_tmpfs(mount, "ro", f"{SPEEDUP} {args}")
    elif os.geteuid() != 0:  # permissions stop a user
        mount.mkdir()
        mount.chmod(0o555)
        done = subprocess.run(
            f'"{sys.executable}" -m speedup run quickstart --smoke progress_bar=false {args}',
            shell=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    else:
        pytest.skip("root ignores permissions, and no user namespace to mount read-only here")
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert str(place) in line and key in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.slow
def test_real_full_disk_removes_the_partial_write(tmp_path: Path) -> None:
    if not can_mount_privately():
        pytest.skip("no user namespace to mount a small tmpfs here")
    mount, copy = tmp_path / "small", tmp_path / "copy"
    run_dir = tmp_path / "run"
    # A checkpoint of this run takes ~190 KiB: one fits in 280 KiB, the next does not.
    script = (
        f"{SPEEDUP} run_dir={run_dir} checkpoint.folder={mount} checkpoint.keep_last=1 "
        f'checkpoint.interval=2ba; echo "rc=$?"; cp -a "{mount}" "{copy}"'
    )
    done = on_tmpfs(mount, "size=280k", script)
    assert done.stdout.strip().splitlines()[-1] == "rc=1", done.stderr
    line = one_error_line(done.stderr)
    assert line.startswith(f"error: {mount}: cannot write checkpoint ep0-ba4: [Errno 28]")
    assert "free once the partial write was removed" in line
    assert sorted(os.listdir(copy)) == ["ep0-ba2", "latest"]  # the partial write is gone
    assert verify_checkpoint(copy / "ep0-ba2")["timestamp"]["batch"] == 2


@pytest.mark.slow  # a fresh interpreter importing torch: ~25 s on the shared 2-core box
def test_unwritable_home_runs_with_the_data_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "home-is-a-file"
    blocker.write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if k != "SPEEDUP_CACHE"}
    env["HOME"] = str(blocker / "home")
    command = [sys.executable, "-m", "speedup", *cli(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "SPEEDUP_CACHE" in line]
    assert len(warned) == 1 and "kept in memory" in warned[0], done.stderr
    assert "Traceback" not in done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4


# -- row 7: damaged meta.json is skipped; `latest` junk is replaced only when speedup's --------


def corrupt(meta: dict, how: str) -> object:
    """``meta`` with one field given a wrong JSON type, as a hand edit or a tool leaves it."""
    changed = json.loads(json.dumps(meta))
    if how == "not-an-object":
        return [changed]
    if how == "files-list":
        changed["files"] = list(changed["files"])
    elif how == "file-entry-string":
        changed["files"]["model.pt"] = "x"
    elif how == "bytes-string":
        changed["files"]["model.pt"]["bytes"] = str(changed["files"]["model.pt"]["bytes"])
    elif how == "file-outside":
        changed["files"]["../../meta.json"] = changed["files"].pop("model.pt")
    elif how == "written-at-string":
        changed["written_at"] = "yesterday"
    elif how == "timestamp-list":
        changed["timestamp"] = [1, 2]
    elif how == "config-list":
        changed["config"] = ["a"]
    elif how == "format-version-string":
        changed["format_version"] = "1"
    elif how == "algorithms-numbers":
        changed["algorithms"] = [1, 2]
    return changed


HOW = [
    "not-an-object",
    "files-list",
    "file-entry-string",
    "bytes-string",
    "file-outside",
    "written-at-string",
    "timestamp-list",
    "config-list",
    "format-version-string",
    "algorithms-numbers",
]


def test_meta_with_wrong_types_is_skipped_for_the_previous_checkpoint(tmp_path: Path) -> None:
    run_config(quick(tmp_path / "run", "checkpoint.keep_last=0", "checkpoint.interval=2ba"))
    folder = tmp_path / "run" / "checkpoints"
    meta_path = folder / "ep0-ba4" / "meta.json"
    good = json.loads(meta_path.read_text())
    for how in HOW:
        meta_path.write_text(json.dumps(corrupt(good, how)))
        with pytest.warns(UserWarning, match=r"skipped damaged checkpoint.*ep0-ba4/meta\.json"):
            found = verified_latest(folder)
        assert found is not None and found[0] == folder / "ep0-ba2", how
    # A run resumes from the previous one and saves step 4 again over the damaged one.
    meta_path.write_text(json.dumps(corrupt(good, "file-entry-string")))
    with pytest.warns(UserWarning, match="resuming from the previous complete one"):
        summary = run_config(quick(tmp_path / "run", "checkpoint.interval=2ba"))
    assert summary["resumed_from"] == str(folder / "ep0-ba2") and summary["steps"] == 4
    assert verify_checkpoint(folder / "ep0-ba4")["final"] is True
    assert find_latest(folder) == folder / "ep0-ba4"


@pytest.mark.parametrize("pointer", ["dangling-link", "one-line-file"])
def test_latest_junk_of_speedups_own_is_replaced(tmp_path: Path, pointer: str) -> None:
    cfg = quick(tmp_path / "run", "checkpoint.keep_last=0", "checkpoint.interval=2ba")
    run_config(cfg)
    folder = tmp_path / "run" / "checkpoints"
    (folder / "latest").unlink()
    if pointer == "dangling-link":  # its checkpoint was deleted by hand
        (folder / "latest").symlink_to("ep7-ba99", target_is_directory=True)
    else:  # the form written where symlinks are unavailable
        (folder / "latest").write_bytes(b"ep0-ba2\n")
    check_folder(folder)  # accepted: it is speedup's pointer
    summary = run_config(quick(tmp_path / "run", "checkpoint.interval=2ba", "max_duration=6ba"))
    assert summary["resumed_from"] == str(folder / "ep0-ba4") and summary["steps"] == 6
    assert os.readlink(folder / "latest") == "ep0-ba6"


class LatestBecomesADirectory(Callback):
    """Someone makes ``latest`` a directory of theirs during training, after the start checks."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def batch_end(self, state: State, logger: Logger) -> None:
        if state.timestamp.batch == 2:
            link = self.folder / "latest"
            link.unlink()
            link.mkdir()
            (link / "theirs.txt").write_bytes(b"theirs")


def test_latest_taken_during_training_is_left_and_the_run_finishes(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    with pytest.warns(UserWarning, match=r"latest: not written by speedup, so left as it is"):
        summary = run_config(
            quick(tmp_path / "run"), extra_callbacks=[LatestBecomesADirectory(folder)]
        )
    assert summary["steps"] == 4 and (tmp_path / "run" / "summary.json").exists()
    assert (folder / "latest" / "theirs.txt").read_bytes() == b"theirs"
    assert find_latest(folder) == folder / "ep0-ba4"  # resuming does not need the pointer


def test_clean_leftovers_removes_only_its_own(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    plant_foreign(folder)
    before = tree(folder)
    meta = json.dumps({"format": FORMAT, "format_version": 1}).encode()
    own = plant_own_leftovers(folder, meta)
    removed = sorted(p.name for p in clean_leftovers(folder))
    assert removed == sorted(own)
    assert tree(folder) == before
    assert clean_leftovers(folder) == [] and tree(folder) == before  # nothing else, ever
