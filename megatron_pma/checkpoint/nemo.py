"""NeMo 2 checkpoints: a Megatron ``torch_dist`` checkpoint under ``weights/``, plus ``context/``.

NeMo 2 (``nemo.lightning``) saves one directory per checkpoint under ``<log_dir>/checkpoints/``,
named by its ``ModelCheckpoint`` filename template, by default
``<model>--val_loss=2.34-step=99-consumed_samples=800.0`` (and ``...-last`` for the save-last copy)::

    <ckpt>/weights/   megatron-core dist checkpoint (metadata.json, .metadata, *.distcp, common.pt);
                      model keys carry the ``module.`` prefix of NeMo's MegatronParallel wrapper
    <ckpt>/context/   io.json, model.yaml, tokenizer files (rank 0, to rebuild the model)

While a save is in flight (and until an async save is finalized) ``ModelCheckpoint`` keeps an
empty marker file *beside* the checkpoint: the checkpoint path without ``.ckpt`` and without an
``-EMA`` suffix, plus ``-unfinished``. A checkpoint whose marker exists is not final, even when
its ``weights/metadata.json`` is already there. ``-EMA`` dirs hold EMA weights of the same
step; discovery skips them (give one explicitly to merge it).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from megatron_pma.checkpoint import dcp
from megatron_pma.errors import PMAError

WEIGHTS = "weights"
CONTEXT = "context"
UNFINISHED_SUFFIX = "-unfinished"
LAST_SUFFIX = "-last"
EMA_SUFFIX = "-EMA"
# PTL renders "{step}" as "step=<int>"; don't read "global_step=" or "max_step=" style names.
_STEP = re.compile(r"(?<![A-Za-z0-9_])step=(\d+)")


def is_checkpoint(path: Path) -> bool:
    """A NeMo 2 checkpoint dir (complete or not): it has ``weights/`` or ``context/``."""
    path = Path(path)
    return (path / WEIGHTS).is_dir() or (path / CONTEXT).is_dir()


def root_of(path: Path) -> Path | None:
    """The NeMo 2 checkpoint dir for ``path`` (the dir itself or its ``weights/``), else None."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    if path.name == WEIGHTS and is_checkpoint(path.parent):
        return path.parent
    return None


def dcp_dir(path: Path) -> Path:
    """Where the torch_dist files of ``path`` live: ``weights/`` for NeMo 2, else ``path``."""
    root = root_of(path)
    return root / WEIGHTS if root is not None else Path(path)


def marker_path(ckpt: Path) -> Path:
    """NeMo's unfinished-save marker for ``ckpt`` (ModelCheckpoint's naming rule)."""
    name = str(ckpt).removesuffix(".ckpt").removesuffix(EMA_SUFFIX)
    return Path(name + UNFINISHED_SUFFIX)


def is_unfinished(ckpt: Path) -> bool:
    return marker_path(ckpt).exists()


def check_finished(ckpt: Path) -> None:
    marker = marker_path(ckpt)
    if marker.exists():
        raise PMAError(f"{ckpt}: NeMo save not finished ({marker.name} exists); wait for it, "
                       "or remove the marker if the save is known to be complete")


def step_from_name(path: Path) -> int | None:
    m = _STEP.search(Path(path).name)
    return int(m.group(1)) if m else None


def step_from_state(state: dict | None) -> int | None:
    """The step in a common state: Lightning's ``global_step`` (Megatron-LM's ``iteration``)."""
    if not isinstance(state, dict):
        return None
    for key in ("global_step", "iteration"):
        if isinstance(state.get(key), int):
            return state[key]
    return None


def step_of(ckpt: Path) -> int | None:
    """``step=N`` in the name, else the saved ``global_step`` (a filename template without {step})."""
    from megatron_pma.checkpoint.common_state import read_common_state

    step = step_from_name(ckpt)
    return step if step is not None else step_from_state(read_common_state(Path(ckpt) / WEIGHTS))


def is_save_dir(save_dir: Path) -> bool:
    """A NeMo ``checkpoints/`` dir: some child is a NeMo 2 checkpoint or an unfinished marker."""
    try:
        entries = list(os.scandir(save_dir))
    except OSError:
        return False
    for entry in entries:
        try:
            if entry.name.endswith(UNFINISHED_SUFFIX) and entry.is_file():
                return True
            if entry.is_dir() and is_checkpoint(Path(entry.path)):
                return True
        except PermissionError:  # an unreadable neighbour says nothing about the layout
            continue
    return False


def list_checkpoints(save_dir: Path) -> list[tuple[int, Path]]:
    """Final NeMo 2 checkpoints of a ``checkpoints/`` dir as (step, path), oldest first.

    Final: ``weights/metadata.json`` exists and no ``-unfinished`` marker. ``-EMA`` dirs are
    skipped. A ``-last`` dir and a regular dir of the same step hold the same state: the
    regular one is kept (NeMo's top-k rotation may delete it later, ``-last`` moves on).
    """
    by_step: dict[int, list[Path]] = {}
    for entry in os.scandir(save_dir):
        path = Path(entry.path)
        if not entry.is_dir() or entry.name.endswith(EMA_SUFFIX):
            continue
        try:
            if not (path / WEIGHTS / dcp.MEGATRON_METADATA_FILE).is_file() or is_unfinished(path):
                continue
        except PermissionError:  # cannot tell whether it is final: never skip it silently
            raise PMAError(f"{path}: permission denied") from None
        step = step_of(path)
        if step is not None:
            by_step.setdefault(step, []).append(path)
    return [(step, _preferred(paths)) for step, paths in sorted(by_step.items())]


def _preferred(paths: list[Path]) -> Path:
    return min(paths, key=lambda p: (p.name.endswith(LAST_SUFFIX), p.name))


def copy_extras(src_root: Path, stage: Path) -> None:
    """Copy everything at the top of a NeMo 2 checkpoint but ``weights/`` (``context/``, ...)."""
    for entry in os.scandir(src_root):
        if entry.name == WEIGHTS or entry.name.startswith("."):
            continue
        target = stage / entry.name
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True)
        else:
            shutil.copy2(entry.path, target, follow_symlinks=False)
