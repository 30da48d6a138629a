"""Megatron checkpoints on disk, read and written without building a model or importing megatron."""
