"""Names shared by the engine, the command line and the training side, each defined once."""

OPTIMIZER_MODES = ("drop", "average", "keep-last-moments")
# Megatron-LM's save-dir tracker (Bridge writes it too, "for compatibility" with Megatron-LM).
TRACKER = "latest_checkpointed_iteration.txt"
# Megatron-Bridge: each iter_* holds train_state.pt; the save dir's latest_train_state.pt is a
# copy of the newest one, and Bridge's loader reads it before the .txt tracker.
TRAIN_STATE = "train_state.pt"
TRAIN_STATE_TRACKER = "latest_train_state.pt"
PROVENANCE_FILE = "pma_provenance.json"
