"""Atomic publication: build in a hidden staging dir beside the output, fsync, rename.

A killed run leaves at most a hidden ``.<name>.pma-staging`` folder or a tracker's hidden temp
file (both removed by the next run), never a visible partial output; a save dir's tracker is
written only after the rename.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from megatron_pma.checkpoint.discovery import TRACKER
from megatron_pma.errors import PMAError
from megatron_pma.names import TRAIN_STATE_TRACKER

STAGING_SUFFIX = ".pma-staging"
RETIRED_SUFFIX = ".pma-retired"


class Staging:
    """A hidden, uniquely named build folder beside ``output`` whose owner holds a flock.

    The lock (a sibling ``<folder>.lock``) tells a live merge from a killed one: only folders
    whose lock can be taken are stale and removed, so two merges never delete each other's work.
    """

    def __init__(self, output: Path, token: str):
        output = Path(output)
        self.path = output.parent / f".{output.name}{STAGING_SUFFIX}-{token}"
        self.retired = output.parent / f".{output.name}{RETIRED_SUFFIX}-{token}"
        self._lock_fd = None

    @property
    def lock_path(self) -> Path:
        return _lock_path(self.path)

    def create(self) -> "Staging":
        self._lock_fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.path.mkdir()
        return self

    def release(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            try:
                self.lock_path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None


def _lock_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".lock")


def _owner_alive(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # a file system without flock: assume alive, never delete others' work
        return True
    finally:
        os.close(fd)


def remove_stale(output: Path) -> list[Path]:
    """Remove staging / retired folders (and locks) that killed merges into ``output`` left, and
    the trackers' temp files beside it whose writer (a process of this host) is gone."""
    output = Path(output)
    removed = []
    if not output.parent.is_dir():
        return removed
    for suffix in (STAGING_SUFFIX, RETIRED_SUFFIX):
        for p in output.parent.glob(f".{output.name}{suffix}*"):
            if p.name.endswith(".lock"):
                if not p.with_name(p.name[: -len(".lock")]).exists() and not _owner_alive(p):
                    p.unlink(missing_ok=True)
                continue
            if not _owner_alive(_lock_path(p)):
                shutil.rmtree(p, ignore_errors=True)
                _lock_path(p).unlink(missing_ok=True)
                removed.append(p)
    for name in (TRACKER, TRAIN_STATE_TRACKER):
        for p in output.parent.glob(f".{name}.tmp-*"):
            pid = _tmp_writer_pid(p, name)
            if pid is not None and not _pid_alive(pid):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    """A process of this host with that pid runs (a killed one not yet reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc: assume it runs, never delete a live writer's file
        return True


def in_flight(output: Path) -> bool:
    """A live merge (one whose owner still holds its staging lock) is building ``output``."""
    output = Path(output)
    if not output.parent.is_dir():
        return False
    return any(_owner_alive(lock) for lock in output.parent.glob(f".{output.name}{STAGING_SUFFIX}-*.lock"))


@contextmanager
def created_parents(output: Path):
    """Create the missing folders above ``output`` for the block; if it fails, remove the ones this
    call created (deepest first, each only if empty), so a failed merge leaves nothing behind."""
    missing = []
    parent = Path(output).absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    created = []
    try:
        for folder in reversed(missing):  # outermost first
            try:
                folder.mkdir()
            except FileExistsError:  # another rank or process made it: not ours to remove
                continue
            except OSError as e:
                raise PMAError(f"{folder}: cannot create the output's folder ({e.strerror})") from None
            created.append(folder)
        yield created
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:  # not empty or already gone: someone else's files, leave them
                pass
        raise


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Temp files are named after their writer (host and pid): a later run on this host can tell one a
# killed writer left from one being written, also on a file system other hosts share.
_HOST = socket.gethostname().replace("/", "_") or "localhost"


def atomic_tmp(path: Path, pid: int | None = None) -> Path:
    """The hidden temp file :func:`write_file_atomic` writes ``path`` through in process ``pid``."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{_HOST}-{os.getpid() if pid is None else pid}"


def _tmp_writer_pid(tmp: Path, name: str) -> int | None:
    """The pid in an :func:`atomic_tmp` name of file ``name``, if its writer ran on this host."""
    host, _, pid = tmp.name[len(f".{name}.tmp-"):].rpartition("-")
    return int(pid) if host == _HOST and pid.isdigit() else None


def write_file_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    path = Path(path)
    tmp = atomic_tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_path(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0


def publish(staging: Staging, output: Path, *, replace: bool, fsync: bool = True) -> None:
    """Make the staging folder visible as ``output`` in one rename (an atomic swap when replacing)."""
    stage, output = staging.path, Path(output)
    if fsync:
        for root, _dirs, files in os.walk(stage):
            for name in files:
                fsync_path(Path(root) / name)
            fsync_path(Path(root))
    if output.exists():
        if not replace:
            raise PMAError(f"{output}: already exists (use --force to replace it)")
        if _exchange(stage, output):
            shutil.rmtree(stage)  # now holds the old output
        else:
            retired = staging.retired
            os.rename(output, retired)
            os.rename(stage, output)
            shutil.rmtree(retired)
    else:
        try:
            os.rename(stage, output)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise PMAError(f"{output}: appeared while merging; not replaced") from None
            raise
    if fsync:
        fsync_path(output.parent)


def write_tracker(save_dir: Path, iteration: int, fsync: bool = True) -> None:
    write_file_atomic(Path(save_dir) / TRACKER, f"{iteration}".encode(), fsync=fsync)


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
