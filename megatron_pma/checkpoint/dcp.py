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
import zipfile
from dataclasses import dataclass
from pathlib import Path

from megatron_pma.checkpoint import dcp_types, safe_pickle
from megatron_pma.checkpoint.dcp_types import STORAGE_DTYPES, BytesStorageMetadata, DType, Metadata
from megatron_pma.errors import PMAError

METADATA_FILE = ".metadata"
MEGATRON_METADATA_FILE = "metadata.json"
COMMON_FILE = "common.pt"


def read_metadata(ckpt_dir: Path) -> Metadata:
    """The checkpoint's DCP metadata, read through the allowlist (:mod:`safe_pickle`), with every
    storage entry inside the checkpoint folder."""
    path = Path(ckpt_dir) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            md = dcp_types.Unpickler(f, path).load()
    except PMAError:  # a refused global
        raise
    except FileNotFoundError:
        raise PMAError(f"{path}: missing DCP metadata (incomplete or not a torch_dist checkpoint)") from None
    except PermissionError:
        raise PMAError(f"{path}: permission denied") from None
    except Exception as e:  # corrupted pickle: any unpickling error
        raise PMAError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise PMAError(f"{path}: not a DCP Metadata object ({type(md).__name__})")
    check_storage_paths(Path(ckpt_dir), md)
    return md


def check_storage_paths(ckpt_dir: Path, md: Metadata) -> None:
    """Every storage entry names a file inside the checkpoint folder: a relative path without
    ``..`` whose real path (symlinks followed) stays inside. Else a merge would read (and copy
    into its output) any file the user can read."""
    root = ckpt_dir.resolve()
    seen = set()
    for idx, info in md.storage_data.items():
        rel = getattr(info, "relative_path", None)
        if rel in seen:
            continue
        bad = not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts
        if not bad:
            real = (root / rel).resolve()
            bad = real == root or root not in real.parents
        if bad:
            raise PMAError(f"{ckpt_dir / METADATA_FILE}: key {getattr(idx, 'fqn', idx)} is stored at "
                           f"{rel!r}, outside the checkpoint folder; refusing to read it")
        seen.add(rel)


def check_pickles(ckpt_dir: Path, md: Metadata, root: Path | None = None) -> None:
    """Load every pickle a merge may copy verbatim from this checkpoint through the allowlist
    (:mod:`safe_pickle`): the byte objects (``torch.save`` blobs that Megatron's DCP load
    unpickles with ``weights_only=False``: rng state, extra state, common state) and every
    pickled file under ``root`` (default ``ckpt_dir``; a NeMo 2 checkpoint's outer folder):
    ``common.pt``, Bridge's ``train_state.pt``, ... Tensor blobs are read through the same
    allowlist when located (and Megatron loads them with ``weights_only=True``)."""
    keys = set(bytes_entries(md))
    for idx, info in md.storage_data.items():
        if idx.fqn in keys:
            path = Path(ckpt_dir) / info.relative_path
            safe_pickle.check(read_bytes(str(path), info.offset, info.length), f"{path} (byte object {idx.fqn})")
    ckpt_dir = Path(ckpt_dir)
    safe_pickle.check_tree(root or ckpt_dir, skip=lambda p: p.parent == ckpt_dir and (
        p.suffix == ".distcp" or p.name == METADATA_FILE))  # read above, through the metadata


def check_tensor_blobs(ckpt_dir: Path, md: Metadata, indexes) -> None:
    """Read the ``data.pkl`` of these chunks' tensor blobs through the allowlist (the merge copies
    them verbatim: the newest input's chunks that are not averaged)."""
    files = {}
    try:
        for index in indexes:
            info = md.storage_data.get(index)
            if info is None:  # the merge's reader reports it, with its own fallback lookup
                continue
            path = str(Path(ckpt_dir) / info.relative_path)
            f = files.get(path) or files.setdefault(path, open(path, "rb", buffering=0))
            locate_tensor(f, path, info.offset, info.length)
    finally:
        for f in files.values():
            f.close()


@dataclass(frozen=True)
class TensorLocation:
    """Where one stored tensor's raw bytes are, and how to view them."""

    path: str           # absolute file path
    data_offset: int    # byte offset of the tensor's first element in the file
    dtype: DType
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


class _TensorPickleReader(safe_pickle.Restricted, pickle.Unpickler):
    """Reads torch.save's ``data.pkl`` for a single tensor without materialising it."""

    def resolve(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:  # torch.save names storages by class
            return DType.get(STORAGE_DTYPES[name])
        if module == "torch" and DType.get(name) is not None:
            return DType.get(name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        typename, storage_type, key, _location, numel = pid[:5]
        if typename != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {typename!r}")
        dtype = storage_type
        if not isinstance(dtype, DType):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        return _StorageRef(key, dtype, numel)


_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")


def locate_tensor(f, path: str, start: int, length: int) -> TensorLocation:
    """Find the raw bytes of the tensor stored as a torch.save blob at [start, start+length)."""
    try:
        zf = zipfile.ZipFile(_Range(f, start, length))
        names = zf.namelist()
        pkl_name = next(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
        prefix = pkl_name[: -len("data.pkl")]
        reader = _TensorPickleReader(io.BytesIO(zf.read(pkl_name)))
        reader.source = f"{path} (tensor blob at byte {start})"
        ref = reader.load()
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
    itemsize = ref.storage.dtype.itemsize
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


def load_blob_tensor(path: str, start: int, length: int):
    """Slow path for blobs we cannot view in place (strided storage): a plain torch.load."""
    import torch

    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(length)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True).contiguous()


def load_blob_bytes(path: str, start: int, length: int):
    """The raw bytes (a numpy uint8 array) of a blob's tensor made contiguous (imports torch)."""
    import torch

    return load_blob_tensor(path, start, length).reshape(-1).view(torch.uint8).numpy()


def read_bytes(path: str, start: int, length: int) -> bytes:
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), length, start)
    if len(data) != length:
        raise PMAError(f"{path}: truncated (wanted {length} bytes at {start}, got {len(data)})")
    return data


def bytes_entries(md: Metadata) -> list[str]:
    return [k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
