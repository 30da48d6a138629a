"""Read a torch_dist (PyTorch DCP) checkpoint without building a model or importing megatron.

A checkpoint is ``.metadata`` (a pickled DCP ``Metadata``) plus ``__*_*.distcp`` files. Every
chunk is an independent ``torch.save`` blob at ``[offset, offset + length)`` of one file, found
by (key, chunk offsets). A ``torch.save`` blob is an uncompressed zip, so a tensor's bytes sit at a
fixed position inside it: we locate them once (zip headers + the tiny ``data.pkl``) and then read
them straight into caller-owned buffers, with no per-chunk deserialisation copy.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron_pma.checkpoint import dcp_types
from megatron_pma.checkpoint.dcp_types import (
    BytesStorageMetadata,
    Metadata,
    StorageInfo,
)

from megatron_pma.errors import PMAError

METADATA_FILE = ".metadata"
MEGATRON_METADATA_FILE = "metadata.json"
COMMON_FILE = "common.pt"

# Megatron-core < 0.15 pickled a subclass of DCP's Metadata; map it to a plain stand-in so
# the file reads without megatron installed.
_MCORE_MODULE = "megatron.core.dist_checkpointing.strategies.torch"


class MCoreMetadataStandIn(Metadata):
    """Stand-in for megatron's old ``MCoreMetadata`` (adds ``mcore_data``)."""


class _MCoreSavePlanStandIn:
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
            return StorageInfo  # same fields; avoids importing DCP's filesystem machinery
        if module == _MCORE_MODULE and name == "MCoreMetadata":
            return MCoreMetadataStandIn
        if module == _MCORE_MODULE and name == "MCoreSavePlan":
            return _MCoreSavePlanStandIn
        if module.startswith("torch.distributed.checkpoint."):
            # e.g. .planner (SavePlan, WriteItem: Megatron pickles its save plans in the metadata).
            # Without this the package __init__ runs: its default_planner imports DTensor and
            # sympy, ~0.7 s of every merge process's start-up.
            return getattr(dcp_types._light_import(module), name)
        return super().find_class(module, name)


def read_metadata(ckpt_dir: Path) -> Metadata:
    path = Path(ckpt_dir) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise PMAError(f"{path}: missing DCP metadata (incomplete or not a torch_dist checkpoint)") from None
    except PermissionError:
        raise PMAError(f"{path}: permission denied") from None
    except Exception as e:  # corrupted pickle: any unpickling error
        raise PMAError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise PMAError(f"{path}: not a DCP Metadata object ({type(md).__name__})")
    return md


@dataclass(frozen=True)
class TensorLocation:
    """Where one stored tensor's raw bytes are, and how to view them."""

    path: str           # absolute file path
    data_offset: int    # byte offset of the tensor's first element in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    contiguous: bool     # bytes are exactly the row-major tensor (no strides/offset games)


class _Range(io.RawIOBase):
    """A read-only, seekable window ``[start, start + length)`` of an open file."""

    def __init__(self, f, start: int, length: int):
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=0):
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b):
        n = max(0, min(len(b), self._len - self._pos))
        if n == 0:
            return 0
        got = os.preadv(self._f.fileno(), [memoryview(b)[:n]], self._start + self._pos)
        self._pos += got
        return got


class _StorageRef:
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    __slots__ = ("storage", "storage_offset", "size", "stride")

    def __init__(self, storage, storage_offset, size, stride):
        self.storage, self.storage_offset, self.size, self.stride = storage, storage_offset, tuple(size), tuple(stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage, storage_offset, size, stride)


class _TensorPickleReader(pickle.Unpickler):
    """Reads torch.save's ``data.pkl`` for a single tensor without materialising it."""

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name in ("bfloat16", "float16", "float32", "float64", "int64",
                                          "int32", "int16", "int8", "uint8", "bool"):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        typename, storage_type, key, _location, numel = pid[:5]
        if typename != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {typename!r}")
        dtype = storage_type
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        return _StorageRef(key, dtype, numel)


def _storage_dtypes() -> dict[str, torch.dtype]:
    # torch.save pickles legacy storage classes (torch.FloatStorage, ...) by name.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: getattr(torch, name).dtype for name in dir(torch)
                if name.endswith("Storage") and name not in ("UntypedStorage", "TypedStorage")
                and hasattr(getattr(torch, name), "dtype") and isinstance(getattr(torch, name).dtype, torch.dtype)}


_STORAGE_DTYPES = _storage_dtypes()

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")


def locate_tensor(f, path: str, start: int, length: int) -> TensorLocation:
    """Find the raw bytes of the tensor stored as a torch.save blob at [start, start+length)."""
    try:
        zf = zipfile.ZipFile(_Range(f, start, length))
        names = zf.namelist()
        pkl_name = next(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
        prefix = pkl_name[: -len("data.pkl")]
        ref = _TensorPickleReader(io.BytesIO(zf.read(pkl_name))).load()
        if not isinstance(ref, _TensorRef):
            raise pickle.UnpicklingError(f"blob holds {type(ref).__name__}, not a tensor")
        info = zf.getinfo(f"{prefix}data/{ref.storage.key}")
    except (zipfile.BadZipFile, StopIteration, KeyError, pickle.UnpicklingError, EOFError,
            struct.error, ValueError, OSError) as e:
        raise PMAError(f"{path}: corrupted tensor blob at byte {start} ({type(e).__name__}: {e})") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise PMAError(f"{path}: compressed tensor blob at byte {start} is not supported")
    header = os.pread(f.fileno(), _LOCAL_HEADER.size, start + info.header_offset)
    if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise PMAError(f"{path}: corrupted zip header at byte {start + info.header_offset}")
    name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
    data_offset = start + info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    itemsize = torch.empty((), dtype=ref.storage.dtype).element_size()
    expected_stride = _contiguous_stride(ref.size)
    numel = 1
    for s in ref.size:
        numel *= s
    contiguous = (ref.storage_offset == 0 and (ref.stride == expected_stride or numel <= 1)
                  and ref.storage.numel == numel)
    if info.file_size < ref.storage.numel * itemsize or data_offset + numel * itemsize > start + length:
        raise PMAError(f"{path}: tensor blob at byte {start} is shorter than its tensor")
    return TensorLocation(path, data_offset if contiguous else -1, ref.storage.dtype, ref.size, contiguous)


def _contiguous_stride(size):
    stride, acc = [], 1
    for s in reversed(size):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def load_blob_tensor(path: str, start: int, length: int) -> torch.Tensor:
    """Slow path for blobs we cannot view in place (strided storage): a plain torch.load."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(length)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True).contiguous()


def read_bytes(path: str, start: int, length: int) -> bytes:
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), length, start)
    if len(data) != length:
        raise PMAError(f"{path}: truncated (wanted {length} bytes at {start}, got {len(data)})")
    return data


def bytes_entries(md: Metadata) -> list[str]:
    return [k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
