"""megatron-pma: checkpoint merging (PMA / LAWA) for Megatron-Core checkpoints and a
Lopti-aware policy loss for GRPO-style RL."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import megatron_pma` stays cheap (no torch import for the CLI's --help).
    if name == "merge_checkpoints":
        from megatron_pma.merge import merge_checkpoints

        return merge_checkpoints
    raise AttributeError(name)


__all__ = ["merge_checkpoints", "__version__"]
