"""NeMo 2 checkpoints: the tensors under ``<ckpt>/weights/``, ``context/`` beside them, no tracker.

The on-disk facts (names, the ``-unfinished`` marker, ``step=N``) are in
:mod:`megatron_pma.checkpoint.nemo`; this module answers the layout questions with them. A merged
NeMo 2 checkpoint is one too: ``weights/`` + the newest input's ``context/``.
"""

from __future__ import annotations

from pathlib import Path

from megatron_pma.checkpoint import nemo
from megatron_pma.checkpoint.discovery import TRACKER, iteration_from_name
from megatron_pma.errors import PMAError, UnknownIteration
from megatron_pma.layouts.base import Layout, StateFn


class NeMo2(Layout):
    name = "NeMo 2"
    data_subdir = nemo.WEIGHTS
    keeps_tracker = False  # -unfinished markers say which saves are final

    def owns(self, path: Path) -> bool:
        return nemo.root_of(path) is not None

    def root(self, path: Path) -> Path:
        return nemo.root_of(path) or Path(path)

    def data_dir(self, ckpt: Path) -> Path:
        root = self.root(ckpt)
        nemo.check_finished(root)
        weights = root / nemo.WEIGHTS
        if not weights.is_dir():
            raise PMAError(f"{root}: NeMo 2 checkpoint without {nemo.WEIGHTS}/ (incomplete save?)")
        return weights

    def iteration(self, ckpt: Path, state: StateFn) -> int:
        """``step=N`` in the name, else ``iter_XXXXXXX`` (our outputs), else the saved global_step."""
        root = self.root(ckpt)
        for step in (nemo.step_from_name(root), iteration_from_name(root)):
            if step is not None:
                return step
        step = nemo.step_from_state(state())
        if step is None:
            raise UnknownIteration(f"{root}: cannot tell its step (no step=N in the name, no global_step saved; "
                                   "--order given takes the inputs in the order typed)")
        return step

    def copy_beside(self, newest: Path, stage: Path) -> None:
        nemo.copy_extras(self.root(newest), stage)


    def owns_save_dir(self, save_dir: Path) -> bool:
        return not (Path(save_dir) / TRACKER).exists() and nemo.is_save_dir(save_dir)

    def list_checkpoints(self, save_dir: Path, up_to_tracker: bool = True) -> list[tuple[int, Path]]:
        return nemo.list_checkpoints(save_dir)

    def is_complete(self, ckpt: Path) -> bool:
        return not nemo.is_unfinished(ckpt) and super().is_complete(nemo.dcp_dir(ckpt))


LAYOUT = NeMo2()
