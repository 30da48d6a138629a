"""What every checkpoint layout answers, with Megatron-LM's answers as the defaults.

A *layout* says where checkpoints live and what surrounds their tensors: which folders of a save
dir are checkpoints, which iteration (and how many tokens) each one stands for, whether it is
complete, which side files go into a merged checkpoint and which must not, and which trackers
point a trainer at it afterwards. How the tensors are stored is a *format*'s business
(:mod:`megatron_pma.formats`); a layout never reads tensor bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from megatron_pma.checkpoint import publish
from megatron_pma.checkpoint.common_state import consumed_tokens, read_common_state
from megatron_pma.checkpoint.discovery import (
    TRACKER,
    is_complete,
    iter_dir_name,
    iteration_from_name,
    read_tracker,
)
from megatron_pma.errors import PMAError, UnknownIteration

# Read lazily: most checkpoints name their iteration, so their common state is never unpickled.
StateFn = Callable[[], "dict | None"]


class Layout:
    """Megatron-LM: ``<save>/iter_XXXXXXX/`` holding the tensors, ``latest_checkpointed_iteration.txt``."""

    name = "Megatron-LM"
    keeps_tracker = True  # the save dir has a tracker that says which saves are final

    # -- one checkpoint ------------------------------------------------------------------------

    def owns(self, path: Path) -> bool:
        """``path`` is a checkpoint of this layout (complete or not)."""
        return True

    def root(self, path: Path) -> Path:
        """The checkpoint folder ``path`` stands for (NeMo 2: ``weights/`` -> its parent)."""
        return Path(path)

    def data_dir(self, ckpt: Path) -> Path:
        """Where the tensor files are; raises PMAError when the checkpoint cannot be merged yet."""
        return Path(ckpt)

    def iteration(self, ckpt: Path, state: StateFn) -> int:
        it = iteration_from_name(ckpt)
        if it is None:
            s = state()
            it = s.get("iteration") if s else None
            if not isinstance(it, int):
                raise UnknownIteration(f"{ckpt}: cannot tell its iteration (name it iter_XXXXXXX, or pass "
                                       "--order given to take the inputs in the order typed)")
        return it

    def tokens(self, ckpt: Path, iteration: int, tokens_per_iter: int | None) -> int | None:
        """Tokens seen up to this checkpoint (None: the checkpoint does not say)."""
        state = None if tokens_per_iter else read_common_state(self.data_dir(ckpt))
        return consumed_tokens(state, iteration, tokens_per_iter)

    def tokens_hint(self) -> str:
        return "no args.seq_length / global_batch_size"

    def left_out(self, newest: Path) -> dict[str, str]:
        """Entries beside the newest input's tensor files that a merge must not copy: name -> why."""
        return {}

    def copy_beside(self, newest: Path, stage: Path) -> None:
        """Copy what sits beside the tensor folder (NeMo 2: ``context/``); nothing here."""

    def stamp_iteration(self, stage: Path, iteration: int) -> None:
        """Write the output's iteration into the layout's own files beside the tensors (Bridge's
        ``train_state.pt``); the format stamps its common state. Nothing here."""

    # Where a checkpoint's tensor files sit inside it (NeMo 2: "weights"), the merge's output too.
    data_subdir = ""
    # Optimizer state kept beside the tensor folder in a format of its own (NeMo-RL's DTensor
    # backend: "policy/optimizer"); None where it lives with the tensors or nowhere.
    optimizer_subdir: str | None = None
    # Megatron-Bridge's Hugging Face export of each checkpoint, a folder inside the tensor folder
    # ("hf"): merged into the output's only with ``merge_hf_export`` (see megatron_pma.hf_export);
    # None where the layout has no such export.
    hf_export_subdir: str | None = None
    # The layout's loader reads an ``optimizer`` entry in the common state as "this checkpoint has
    # optimizer state" (NeMo-RL's get_resume_paths): with --optimizer drop the entry is removed.
    optimizer_flag_in_common_state = False

    def check_output(self, output: Path, newest_iteration: int, trackers: bool) -> None:
        """Refuse, before anything is written, an output this layout could not point a trainer at."""

    # -- a save dir ----------------------------------------------------------------------------

    def owns_save_dir(self, save_dir: Path) -> bool:
        return True

    def read_tracker(self, save_dir: Path) -> int | str | None:
        """The iteration the save dir's tracker names, "release", or None without a tracker."""
        return read_tracker(save_dir)

    def list_checkpoints(self, save_dir: Path, up_to_tracker: bool = True) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first; with ``up_to_tracker`` none newer than the tracker
        (its save is not final)."""
        tracker = self.read_tracker(save_dir) if up_to_tracker else None
        found = []
        try:
            entries = list(os.scandir(save_dir))
        except PermissionError:
            raise PMAError(f"{save_dir}: permission denied") from None
        for entry in entries:
            it = iteration_from_name(Path(entry.name))
            if it is None or not entry.is_dir():
                continue
            try:
                complete = self.is_complete(Path(entry.path))
            except PermissionError:
                raise PMAError(f"{entry.path}: permission denied") from None
            if not complete or (isinstance(tracker, int) and it > tracker):
                continue
            found.append((it, Path(entry.path)))
        return sorted(found)

    def is_complete(self, ckpt: Path) -> bool:
        return is_complete(ckpt)

    def write_trackers(self, save_dir: Path, iteration: int, output: Path, fsync: bool = True) -> None:
        """Point the save dir at ``output`` (called after it is published, so the tracker is last)."""
        publish.write_tracker(save_dir, iteration, fsync=fsync)

    def trackers(self) -> tuple[str, ...]:
        """The tracker files this layout writes (to clean up after a killed write)."""
        return (TRACKER,)

    def output_name(self, iteration: int) -> str:
        """What the watcher names the merge of the window ending at ``iteration`` (NeMo-RL: step_N)."""
        return iter_dir_name(iteration)


def has_file(path: Path, name: str) -> bool:
    try:
        return (Path(path) / name).is_file()
    except PermissionError:
        return False

