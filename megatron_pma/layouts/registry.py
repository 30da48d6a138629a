"""The one registry of layouts: which layout a checkpoint or a save dir belongs to."""

from __future__ import annotations

from pathlib import Path

from megatron_pma.checkpoint import discovery
from megatron_pma.errors import PMAError
from megatron_pma.layouts import bridge, hugging_face, megatron_lm, nemo2, nemo_rl
from megatron_pma.layouts.base import Layout

# Most specific first: the first that owns a path wins; Megatron-LM owns whatever is left.
LAYOUTS: tuple[Layout, ...] = (*nemo_rl.LAYOUTS, nemo2.LAYOUT, bridge.LAYOUT, hugging_face.LAYOUT, megatron_lm.LAYOUT)


def of_checkpoint(path: Path) -> Layout:
    return next(layout for layout in LAYOUTS if layout.owns(Path(path)))


def of_save_dir(save_dir: Path) -> Layout:
    return next(layout for layout in LAYOUTS if layout.owns_save_dir(Path(save_dir)))


def check_same(checkpoints) -> None:
    """All inputs (objects with ``layout`` and ``label``, newest last) are of one layout."""
    newest = checkpoints[-1]
    for c in checkpoints[:-1]:
        if c.layout is not newest.layout:
            raise PMAError(f"{c.label}: a {c.layout.name} checkpoint, but {newest.label} is a "
                           f"{newest.layout.name} one; merge checkpoints of one run")


def check_is_checkpoint(path: Path) -> None:
    """A save dir given where a checkpoint is expected is pointed at ``--save-dir``. A layout that
    owns the folder as one checkpoint wins (a NeMo-RL ``step_N`` holds a whole Bridge save dir)."""
    path = Path(path)
    if path.is_dir() and of_checkpoint(path) is megatron_lm.LAYOUT and discovery.is_save_dir(path):
        raise PMAError(f"{path}: is a save dir, not a checkpoint: use --save-dir {path} "
                       "(or name a checkpoint inside it)")
