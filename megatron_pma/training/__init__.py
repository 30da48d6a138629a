"""PMA during training: the in-training hook and the tiny Megatron-Core pretraining example.

Importing this package imports neither torch nor megatron; ``PMAHook`` is loaded on first use.
"""

__all__ = ["PMAHook", "MergeRecord"]


def __getattr__(name):
    if name in ("PMAHook", "MergeRecord"):
        from megatron_pma.training import hook

        return getattr(hook, name)
    raise AttributeError(name)
