"""Read ``.safetensors`` files without torch and without the ``safetensors`` package.

The format (huggingface/safetensors, docs "Format"): an 8-byte little-endian header length N,
N bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, offsets relative to the byte buffer after the header), then the tensors' raw
little-endian bytes, packed with no holes. A sharded save (Hugging Face ``save_pretrained``,
NeMo Automodel) adds ``<prefix>.safetensors.index.json`` (``{"metadata": ..., "weight_map":
{name: file}}``). Everything is checked here, before a merge writes anything: a file shorter than
its header or its data, a header that is not JSON, an index naming a missing shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from megatron_pma.checkpoint.dcp_types import DType
from megatron_pma.errors import PMAError

SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
METADATA_KEY = "__metadata__"
MAX_HEADER = 100 << 20  # the safetensors library refuses larger headers too
# safetensors dtype names -> DType names (dcp_types: one stand-in per dtype, itemsize, numpy view)
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
          "U64": "uint64", "C64": "complex64"}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    offset: int   # absolute byte offset of the first element in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class File:
    path: Path
    header_bytes: int              # 8 + N: the header, copied verbatim into a merged file
    tensors: dict[str, Tensor]     # in file order
    size: int                      # bytes a complete file has


def files_in(folder: Path) -> list[str]:
    """The ``.safetensors`` files under ``folder`` (recursively: NeMo Automodel writes a
    ``consolidated/`` export beside its shards), relative, sorted."""
    folder = Path(folder)
    found = []
    for dirpath, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [str((Path(dirpath) / n).relative_to(folder)) for n in names if n.endswith(SUFFIX)]
    return sorted(found)


def holds_safetensors(folder: Path) -> bool:
    """Cheap: ``folder`` has a ``.safetensors`` file or an index at its top."""
    try:
        return any(e.name.endswith((SUFFIX, INDEX_SUFFIX)) for e in os.scandir(folder))
    except OSError:
        return False


def read_header(path: Path) -> File:
    """Parse and check one file's header; the data must fit in the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PMAError(f"{path}: truncated ({size} bytes: no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise PMAError(f"{path}: truncated (header length {n} runs past the end of the {size}-byte file)")
            if n > MAX_HEADER:
                raise PMAError(f"{path}: header of {n} bytes (over {MAX_HEADER}); not a safetensors file?")
            raw = f.read(n)
    except PermissionError:
        raise PMAError(f"{path}: permission denied") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PMAError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise PMAError(f"{path}: header is not a JSON object")
    base = 8 + n
    tensors: dict[str, Tensor] = {}
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        tensors[name] = _entry(path, name, entry, base)
    # the data buffer is packed: tensors back to back from 0, no holes (the library checks the same)
    end = 0
    for t in sorted(tensors.values(), key=lambda t: t.offset):
        if t.offset - base != end:
            raise PMAError(f"{path}: key {t.name} starts at data byte {t.offset - base}, expected {end} "
                           "(overlapping or holed data: not a valid safetensors file)")
        end += t.nbytes
    if base + end > size:
        last = max(tensors.values(), key=lambda t: t.offset)
        raise PMAError(f"{path}: truncated (key {last.name} ends at byte {base + end}, the file has {size})")
    ordered = dict(sorted(tensors.items(), key=lambda kv: kv[1].offset))
    return File(path, base, ordered, base + end)


def _entry(path: Path, name: str, entry, base: int) -> Tensor:
    bad = lambda what: PMAError(f"{path}: key {name}: {what}")
    if not isinstance(entry, dict):
        raise bad("header entry is not an object")
    dtype = DType.get(DTYPES.get(entry.get("dtype"), ""))
    if dtype is None:
        raise bad(f"dtype {entry.get('dtype')!r} is not supported")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad(f"bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"bad data_offsets {offsets!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, {entry['dtype']} {shape} needs {nbytes}")
    return Tensor(name, dtype, tuple(shape), base + offsets[0], nbytes)


def read_index(path: Path) -> dict:
    """An index file's JSON, checked: a ``weight_map`` of names to files."""
    try:
        index = json.loads(Path(path).read_text())
    except PermissionError:
        raise PMAError(f"{path}: permission denied") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PMAError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise PMAError(f"{path}: no weight_map (not a safetensors index)")
    return index


def with_dtypes(file: File, dtypes: dict[str, DType]) -> tuple[bytes, dict[str, int], int]:
    """``file``'s header with some tensors in another dtype: (the header's bytes, each tensor's
    new absolute offset, the new file size). Tensor order and ``__metadata__`` stay; the JSON is
    padded with spaces to a multiple of 8 bytes, as the safetensors library writes it."""
    with open(file.path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    names = {v.name: k for k, v in ((k, DType.get(v)) for k, v in DTYPES.items())}
    pos, placed = 0, {}
    for t in file.tensors.values():  # in file order
        dtype = dtypes.get(t.name, t.dtype)
        nbytes = t.numel * dtype.itemsize
        header[t.name].update(dtype=names[dtype.name], data_offsets=[pos, pos + nbytes])
        placed[t.name] = pos
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: base + v for k, v in placed.items()}, base + pos


@dataclass(frozen=True)
class Checkpoint:
    """Every safetensors file of one checkpoint folder, checked (headers, data lengths, indexes)."""

    path: Path
    files: dict[str, File]   # relative name -> header
    indexes: list[str]       # relative names of the index files (copied verbatim into a merge)


def read_checkpoint(folder: Path) -> Checkpoint:
    folder = Path(folder)
    names = files_in(folder)
    indexes = sorted(str(p.relative_to(folder)) for p in folder.rglob("*" + INDEX_SUFFIX)
                     if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for rel in indexes:
        index = read_index(folder / rel)
        for tensor_name, shard in sorted(index["weight_map"].items()):
            if not (folder / rel).parent.joinpath(str(shard)).is_file():
                raise PMAError(f"{folder / rel}: names shard {shard} (for {tensor_name}), which is missing")
    if not names:
        raise PMAError(f"{folder}: no {SUFFIX} files")
    return Checkpoint(folder, {rel: read_header(folder / rel) for rel in names}, indexes)
