"""Megatron-LM save directories: the tracker, ``iter_XXXXXXX`` folders, completeness.

A checkpoint counts only once its ``metadata.json`` exists (Megatron writes it last), so a save
still in flight is invisible here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from megatron_pma import schedules
from megatron_pma.checkpoint import dcp
from megatron_pma.checkpoint.common_state import consumed_tokens, read_common_state
from megatron_pma.errors import PMAError

TRACKER = "latest_checkpointed_iteration.txt"
ITER_DIR = re.compile(r"^iter_(\d{7,})$")


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_from_name(path: Path) -> int | None:
    m = ITER_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / dcp.MEGATRON_METADATA_FILE).is_file()


def read_tracker(save_dir: Path) -> int | str | None:
    """The tracker's iteration, the string "release", or None when there is no tracker."""
    path = Path(save_dir) / TRACKER
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise PMAError(f"{path}: not an iteration number or 'release': {text[:40]!r}") from None


def list_checkpoints(save_dir: Path, *, up_to_tracker: bool = True) -> list[tuple[int, Path]]:
    """Complete checkpoints of a save dir, oldest first.

    With ``up_to_tracker`` a checkpoint newer than the tracker is skipped: its save is not final.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        raise PMAError(f"{save_dir}: no such save directory")
    tracker = read_tracker(save_dir) if up_to_tracker else None
    found = []
    for entry in os.scandir(save_dir):
        it = iteration_from_name(Path(entry.name))
        if it is None or not entry.is_dir() or not is_complete(Path(entry.path)):
            continue
        if isinstance(tracker, int) and it > tracker:
            continue
        found.append((it, Path(entry.path)))
    return sorted(found)


def select_window(save_dir: Path, num_models: int, *, interval_iters: int | None = None,
                  interval_tokens: int | None = None, tokens_per_iter: int | None = None,
                  every: int = 1, up_to_iteration: int | None = None) -> list[Path]:
    """The last ``num_models`` complete checkpoints of a save dir, spaced by the interval."""
    tracker = read_tracker(save_dir)
    if tracker == "release":
        raise PMAError(f"{Path(save_dir) / TRACKER}: says 'release' (a released model, not a training "
                       "run's checkpoints); give checkpoint dirs explicitly")
    ckpts = list_checkpoints(save_dir)
    if isinstance(tracker, int) and tracker not in {it for it, _ in ckpts}:
        raise PMAError(f"{Path(save_dir) / TRACKER}: names iteration {tracker}, but "
                       f"{iter_dir_name(tracker)} is missing or incomplete")
    if not ckpts:
        raise PMAError(f"{save_dir}: no complete checkpoint (iter_XXXXXXX with metadata.json)")
    iterations = [it for it, _ in ckpts]
    tokens = None
    if interval_tokens is not None:
        tokens = []
        for it, path in ckpts:
            t = consumed_tokens(None if tokens_per_iter else read_common_state(path), it, tokens_per_iter)
            if t is None:
                raise PMAError(f"{path}: cannot tell tokens per iteration (no args.seq_length / "
                               "global_batch_size); pass --tokens-per-iter")
            tokens.append(t)
    picked = schedules.select_window(iterations, num_models, interval_iters=interval_iters,
                                     interval_tokens=interval_tokens, tokens=tokens, every=every,
                                     up_to_iteration=up_to_iteration)
    return [ckpts[i][1] for i in picked]
