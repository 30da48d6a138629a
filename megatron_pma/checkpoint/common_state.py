"""The non-tensor ("common") state of a Megatron checkpoint, read without Megatron installed.

Up to megatron-core 0.18 it is ``common.pt`` (a plain torch.save); from 0.19 it lives inside DCP
as the byte object ``common_state/...`` holding ``torch.save([state_dict])``. It pickles Megatron
classes (enums in ``args``, ...) and may hold tensors: both are read as inert stand-ins (and torch
is not imported, see :func:`safe_pickle.load_inert`), since we only read plain fields
(``iteration``, ``args.global_batch_size``, ``args.seq_length``, ...). The merge copies the newest
input's bytes verbatim, once they passed the same allowlist.
"""

from __future__ import annotations

from pathlib import Path

from megatron_pma.checkpoint import dcp, legacy, safe_pickle
from megatron_pma.errors import PMAError


def read_common_state(ckpt_dir: Path, md=None) -> dict | None:
    """The common state dict, or None if this checkpoint has none we can find."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / dcp.COMMON_FILE
    try:
        if path.exists():
            state = safe_pickle.load_inert(path)
            return state if isinstance(state, dict) else None
        if md is None and legacy.is_legacy_checkpoint(ckpt_dir):  # args etc. of the first rank file
            path = legacy.rank_dirs(ckpt_dir)[0] / legacy.MODEL_FILE
            return legacy.read_state(ckpt_dir)
        md = md if md is not None else dcp.read_metadata(ckpt_dir)
        key = next((k for k in dcp.bytes_entries(md) if k.startswith("common_state")), None)
        if key is None:
            return None
        info = next(v for i, v in md.storage_data.items() if i.fqn == key)
        blob_path = ckpt_dir / info.relative_path
        state = safe_pickle.load_inert(dcp.read_bytes(str(blob_path), info.offset, info.length),
                                       f"{blob_path} (byte object {key})")
        if isinstance(state, list) and state and isinstance(state[0], dict):
            state = state[0]
        return state if isinstance(state, dict) else None
    except PMAError:
        raise
    except PermissionError as e:
        raise PMAError(f"{e.filename or path}: permission denied") from None
    except Exception as e:
        raise PMAError(f"{path if path.exists() else ckpt_dir}: unreadable common state "
                       f"({type(e).__name__}: {e})") from None


def consumed_tokens(state: dict | None, iteration: int, tokens_per_iter: int | None = None) -> int | None:
    """Tokens seen up to this checkpoint: an explicit per-iteration count wins, then the run's own
    ``consumed_train_samples`` x ``seq_length`` (exact under batch-size ramp-up), then
    iteration x global_batch_size x seq_length."""
    if tokens_per_iter is not None:
        return iteration * tokens_per_iter
    args = state.get("args") if isinstance(state, dict) else None
    seq = getattr(args, "seq_length", None)
    if seq is None:
        return None
    samples = getattr(args, "consumed_train_samples", None)
    if isinstance(samples, int) and samples > 0:
        return samples * seq
    gbs = getattr(args, "global_batch_size", None)
    return iteration * gbs * seq if gbs else None
