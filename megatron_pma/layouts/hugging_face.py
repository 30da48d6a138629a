"""Hugging Face checkpoint folders of one run: ``<run>/checkpoint-500/`` (Trainer), ``step_500/``,
``iter_0000500/``..., each holding ``.safetensors`` weights (``save_pretrained``: one
``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``).

Nothing inside says which step a folder is, so its name must carry the number. There is no
tracker: a merged folder is a plain Hugging Face model dir (``from_pretrained`` loads it).
Optimizer files beside the weights (the Trainer's ``optimizer.pt``) are the newest input's
alone and stay out of a merge.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from megatron_pma.checkpoint import safetensors_file
from megatron_pma.errors import UnknownIteration
from megatron_pma.layouts.base import Layout, StateFn

# checkpoint-500, step_500, iter_0000500, global_step500, step=500, 500
NUMBERED = re.compile(r"^(?:[A-Za-z]+(?:[-_]?[A-Za-z]+)*[-_=]?)?(\d+)$")
OPTIMIZER_PREFIX = "optimizer"


def step_from_name(path: Path) -> int | None:
    m = NUMBERED.match(Path(path).name)
    return int(m.group(1)) if m else None


class HuggingFace(Layout):
    name = "Hugging Face"
    keeps_tracker = False  # a Trainer writes checkpoint-N in place and then rotates old ones

    def owns(self, path: Path) -> bool:
        return safetensors_file.holds_safetensors(Path(path))

    def iteration(self, ckpt: Path, state: StateFn) -> int:
        step = step_from_name(ckpt)
        if step is None:
            raise UnknownIteration(f"{ckpt}: cannot tell its step: name Hugging Face checkpoint folders with "
                                   "their step number (checkpoint-500, step_500, iter_0000500), or pass --order given")
        return step

    def tokens(self, ckpt: Path, iteration: int, tokens_per_iter: int | None) -> int | None:
        return iteration * tokens_per_iter if tokens_per_iter else None

    def tokens_hint(self) -> str:
        return "a Hugging Face checkpoint does not record its tokens"

    def left_out(self, newest: Path) -> dict[str, str]:
        try:
            names = sorted(e.name for e in os.scandir(newest) if e.name.startswith(OPTIMIZER_PREFIX))
        except OSError:
            return {}
        return {n: "the newest input's optimizer state alone (unmerged)" for n in names}

    def owns_save_dir(self, save_dir: Path) -> bool:
        return bool(self.list_checkpoints(save_dir))

    def read_tracker(self, save_dir: Path) -> None:
        return None

    def list_checkpoints(self, save_dir: Path, up_to_tracker: bool = True) -> list[tuple[int, Path]]:
        try:
            entries = [e for e in os.scandir(save_dir) if e.is_dir()]
        except OSError:
            return []
        found = [(step_from_name(Path(e.name)), Path(e.path)) for e in entries]
        return sorted((s, p) for s, p in found if s is not None and self.owns(p))

    def is_complete(self, ckpt: Path) -> bool:
        return self.owns(ckpt)

    def write_trackers(self, save_dir: Path, iteration: int, output: Path, fsync: bool = True) -> None:
        """No tracker: nothing to point at the output."""

    def trackers(self) -> tuple[str, ...]:
        return ()


LAYOUT = HuggingFace()
