"""Megatron-LM save directories: the tracker, ``iter_XXXXXXX`` folders, completeness.

(Listing a save dir and picking a merge window, for every layout: :mod:`megatron_pma.layouts`.)

A checkpoint counts only once its ``metadata.json`` exists (Megatron writes it last), so a save
still in flight is invisible here. A legacy ``--ckpt-format torch`` one (``mp_rank_*/``) counts once
every rank file is finished and the tracker has reached its iteration.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from megatron_pma.checkpoint import dcp, legacy, nemo
from megatron_pma.errors import PMAError
from megatron_pma.names import TRACKER

ITER_DIR = re.compile(r"^iter_(\d{7,})$")


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_from_name(path: Path) -> int | None:
    m = ITER_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(ckpt_dir: Path) -> bool:
    try:
        if (Path(ckpt_dir) / dcp.MEGATRON_METADATA_FILE).is_file():
            return True
        return legacy.is_saved(Path(ckpt_dir)) and _tracker_reached(Path(ckpt_dir))
    except PermissionError:  # cannot tell: never guess, never skip it silently
        raise PMAError(f"{ckpt_dir}: permission denied") from None


def _tracker_reached(ckpt_dir: Path) -> bool:
    """A legacy (``--ckpt-format torch``) save has no completion marker: Megatron writes the
    tracker once every rank has saved. A checkpoint dir with no tracker beside it is taken as is."""
    tracker = read_tracker(ckpt_dir.parent)
    iteration = iteration_from_name(ckpt_dir)
    if not isinstance(tracker, int) or iteration is None:
        return True
    return iteration <= tracker


def check_checkpoint_dir(path: Path) -> None:
    """An input checkpoint folder exists, is a folder and is readable (one-line PMAError if not)."""
    if path.is_symlink() and not path.exists():
        raise PMAError(f"{path}: dangling symbolic link (-> {os.readlink(path)})")
    if not path.exists():
        raise PMAError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise PMAError(f"{path}: not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PMAError(f"{path}: permission denied")


def is_save_dir(path: Path) -> bool:
    """A run's save dir (its tracker, or ``iter_XXXXXXX`` folders inside) or a NeMo ``checkpoints/``
    dir, rather than one checkpoint (for Megatron-LM's layout: see ``layouts.check_is_checkpoint``)."""
    path = Path(path)
    if (path / dcp.MEGATRON_METADATA_FILE).exists() or legacy.is_legacy_checkpoint(path) \
            or nemo.root_of(path) is not None:
        return False
    if (path / TRACKER).is_file():
        return True
    try:
        if any(ITER_DIR.match(e.name) and e.is_dir() for e in os.scandir(path)):
            return True
    except OSError:
        return False
    return nemo.is_save_dir(path)


def read_tracker(save_dir: Path) -> int | str | None:
    """The tracker's iteration, the string "release", or None when there is no tracker."""
    path = Path(save_dir) / TRACKER
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except PermissionError:
        raise PMAError(f"{path if os.access(path.parent, os.X_OK) else path.parent}: permission denied") from None
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise PMAError(f"{path}: not an iteration number or 'release': {text[:40]!r}") from None
