"""Megatron-LM save dirs: ``<save>/iter_XXXXXXX/`` + ``latest_checkpointed_iteration.txt``.

The layout every other one refines, so its answers are :class:`~megatron_pma.layouts.base.Layout`'s
defaults; it owns whatever no other layout claims.
"""

from megatron_pma.layouts.base import Layout


class MegatronLM(Layout):
    name = "Megatron-LM"


LAYOUT = MegatronLM()
