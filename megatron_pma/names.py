"""Names shared by the engine, the command line and the training side, each defined once."""

OPTIMIZER_MODES = ("drop", "average", "keep-last-moments")
# Megatron-LM's save-dir tracker (Bridge writes it too, "for compatibility" with Megatron-LM).
TRACKER = "latest_checkpointed_iteration.txt"
# Megatron-Bridge: each iter_* holds train_state.pt; the save dir's latest_train_state.pt is a
# copy of the newest one, and Bridge's loader reads it before the .txt tracker.
TRAIN_STATE = "train_state.pt"
TRAIN_STATE_TRACKER = "latest_train_state.pt"
# Megatron-Bridge's per-checkpoint Hugging Face export (also in NeMo-RL's Megatron checkpoints):
# merged only when asked.
HF_EXPORT = "hf"
PROVENANCE_FILE = "pma_provenance.json"
# Inputs oldest -> newest: by their iteration, or as the caller gave them.
ORDERS = ("iteration", "given")
# --save-dtype: model weights written in the input's dtype, or in this one (optimizer state keeps its own).
SAVE_DTYPES = {"input": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Transformer Engine's per-module state (FP8 scaling factors, amax history): a key ending in it is
# never averaged, whatever its dtype; the newest input's is kept.
EXTRA_STATE = "_extra_state"


def is_extra_state(key: str) -> bool:
    """``decoder.layers.0.mlp.linear_fc1._extra_state`` (a tensor) or ``..._extra_state/shard_0_2``
    (a byte object)."""
    return key.split("/", 1)[0].endswith(EXTRA_STATE)
