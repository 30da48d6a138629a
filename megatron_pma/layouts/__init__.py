"""Checkpoint layouts: where checkpoints live and what surrounds their tensors.

One module per layout, each a :class:`~megatron_pma.layouts.base.Layout`; this registry finds
the one a checkpoint or a save dir belongs to (`registry.py`). Adding a layout is one module
and one line in `registry.LAYOUTS`.
"""

from megatron_pma.layouts.base import Layout
from megatron_pma.layouts.registry import LAYOUTS, check_is_checkpoint, check_same, of_checkpoint, of_save_dir
from megatron_pma.layouts.window import list_checkpoints, select_window

__all__ = ["LAYOUTS", "Layout", "check_same", "list_checkpoints", "of_checkpoint", "of_save_dir", "select_window"]
