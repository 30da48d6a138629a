"""Atomic publication: build in a hidden staging dir beside the output, fsync, rename.

A killed run leaves at most a hidden ``.<name>.pma-staging`` folder (removed by the next run),
never a visible partial output; a save dir's tracker is written only after the rename.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from pathlib import Path

from megatron_pma.checkpoint.discovery import TRACKER
from megatron_pma.errors import PMAError

STAGING_SUFFIX = ".pma-staging"
RETIRED_SUFFIX = ".pma-retired"


def staging_dir(output: Path) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}{STAGING_SUFFIX}"


def prepare_staging(output: Path) -> Path:
    stage = staging_dir(output)
    if stage.exists():
        shutil.rmtree(stage)  # left over by a killed run
    retired = output.parent / f".{output.name}{RETIRED_SUFFIX}"
    if retired.exists():
        shutil.rmtree(retired)
    stage.mkdir(parents=True)
    return stage


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
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


def publish(stage: Path, output: Path, *, replace: bool, fsync: bool = True) -> None:
    """Make ``stage`` visible as ``output`` in one rename (an atomic swap when replacing)."""
    stage, output = Path(stage), Path(output)
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
            retired = output.parent / f".{output.name}{RETIRED_SUFFIX}"
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
