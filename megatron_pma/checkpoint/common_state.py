"""The non-tensor ("common") state of a Megatron checkpoint, read without Megatron installed.

Up to megatron-core 0.18 it is ``common.pt`` (a plain torch.save); from 0.19 it lives inside DCP
as the byte object ``common_state/...`` holding ``torch.save([state_dict])``. It pickles Megatron
classes (enums in ``args``, ...) and may hold tensors: both are read as inert stand-ins (and torch
is not imported), since we only read plain fields (``iteration``, ``args.global_batch_size``, ``args.seq_length``, ...). The merge itself
never unpickles it: it copies the newest input's bytes verbatim.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

from megatron_pma.checkpoint import dcp, legacy
from megatron_pma.errors import PMAError


class _Opaque:
    """Stand-in for a class we cannot (or need not) import."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __call__(self, *args, **kwargs):  # enums are rebuilt by calling the class
        return _Opaque(*args)


def _opaque_class(module, name):
    return type(name, (_Opaque,), {"__module__": f"pma_standin.{module}"})


class _LenientUnpickler(pickle.Unpickler):
    """``data.pkl`` of a torch.save file, without torch: tensors load as None, unknown classes
    (torch's, Megatron's enums in ``args``, ...) as inert stand-ins."""

    _SAFE_MODULES = ("collections", "argparse", "builtins", "copyreg", "_codecs", "datetime", "pathlib",
                     "enum", "types", "functools")

    def find_class(self, module, name):
        if module.split(".")[0] in self._SAFE_MODULES:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                pass
        if module == "torch._utils" and name.startswith("_rebuild"):
            return _no_tensor
        return _opaque_class(module, name)

    def persistent_load(self, pid):
        return None  # tensor storage: never needed for the plain fields we read


def _no_tensor(*args, **kwargs):
    return None


def _load_torch_save(data: bytes | str) -> object:
    """Unpickle a torch.save zip's ``data.pkl`` (no torch import); torch.load for anything else."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
            return _LenientUnpickler(io.BytesIO(zf.read(name))).load()
    import torch  # pre-1.6 (non-zip) torch.save format: rare

    return torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location="cpu",
                      weights_only=False)


def read_common_state(ckpt_dir: Path, md=None) -> dict | None:
    """The common state dict, or None if this checkpoint has none we can find."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / dcp.COMMON_FILE
    try:
        if path.exists():
            state = _load_torch_save(str(path))
            return state if isinstance(state, dict) else None
        if md is None and legacy.is_legacy_checkpoint(ckpt_dir):  # args etc. of the first rank file
            path = legacy.rank_dirs(ckpt_dir)[0] / legacy.MODEL_FILE
            return legacy.read_state(ckpt_dir)
        md = md if md is not None else dcp.read_metadata(ckpt_dir)
        key = next((k for k in dcp.bytes_entries(md) if k.startswith("common_state")), None)
        if key is None:
            return None
        info = next(v for i, v in md.storage_data.items() if i.fqn == key)
        blob = dcp.read_bytes(str(ckpt_dir / info.relative_path), info.offset, info.length)
        state = _load_torch_save(blob)
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
