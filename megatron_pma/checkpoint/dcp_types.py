"""PyTorch DCP's metadata classes, read and written WITHOUT importing torch.

``import torch`` costs 1.5-2 s per process on a small node: a third of a 4 GiB merge. The merge
only needs the metadata's plain fields, so every class a DCP ``.metadata`` pickles (torch 2.x,
``torch.distributed.checkpoint.metadata`` / ``.filesystem`` / ``.planner``, megatron-core's old
``MCoreMetadata`` subclass, torch dtypes, ``torch.Size``) loads here as a small stand-in that pickles
back under the real class's name, in the same form torch writes: readers of our ``.metadata``
(Megatron, plain DCP) get the genuine torch classes back, and an unmodified file re-pickles byte
for byte. Field names and order follow torch's dataclasses (torch/distributed/checkpoint/metadata.py).
"""

from __future__ import annotations

import copyreg
import io
import pickle
import sys
from typing import Sequence

from megatron_pma.checkpoint import safe_pickle, torch_names

_MD = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
_MCORE = "megatron.core.dist_checkpointing.strategies.torch"


# ---------------------------------------------------------------------------------------------
# torch scalars: dtypes and Size


class DType:
    """Stand-in for a ``torch.dtype``: one instance per name, pickled as the global ``torch.<name>``."""

    _all: dict[str, "DType"] = {}

    def __new__(cls, name: str, itemsize: int, floating: bool, numpy: str | None):
        obj = object.__new__(cls)
        obj.name, obj.itemsize, obj.is_floating_point, obj.numpy = name, itemsize, floating, numpy
        obj._pickle_as = ("torch", name)
        cls._all[name] = obj
        return obj

    @classmethod
    def get(cls, name: str) -> "DType | None":
        return cls._all.get(name)

    def __reduce_ex__(self, protocol):
        return self.name  # a global reference, as torch.dtype pickles

    def __repr__(self):
        return f"torch.{self.name}"

    def __eq__(self, other):
        if isinstance(other, DType):
            return self is other
        return type(other).__name__ == "dtype" and str(other) == repr(self)  # a real torch.dtype

    def __hash__(self):
        return hash(self.name)

    @property
    def torch(self):
        """The real ``torch.dtype`` (imports torch)."""
        import torch

        return getattr(torch, self.name)


for _args in torch_names.DTYPES:
    DType(*_args)
float32, bfloat16, float16 = DType.get("float32"), DType.get("bfloat16"), DType.get("float16")

STORAGE_DTYPES = torch_names.STORAGE_DTYPES
STORAGE_OF = {dtype: storage for storage, dtype in STORAGE_DTYPES.items()}


class Size(tuple):
    """Stand-in for ``torch.Size`` (pickled as ``torch.Size((...))``)."""

    # torch's C pickler memoizes names by object: Size's module string is its own (from the C
    # type's name), not the "torch" its dtypes are pickled with.
    _pickle_as = ("".join(("tor", "ch")), "Size")

    def __reduce__(self):
        return Size, (tuple(self),)


# ---------------------------------------------------------------------------------------------
# Any other global: a class that remembers how each instance was built and pickles back alike.


class StandIn:
    """An object of a class we did not import (planner items, enums, torch.layout, ...).

    Its state's names are interned, as CPython's own BUILD does: torch's pickler memoizes them by
    identity, so this keeps re-pickled bytes identical.
    """

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_pma_new"] = args
        return obj

    def __init__(self, *args, **kwargs):  # only a REDUCE (the class called) runs this
        self.__dict__["_pma_call"] = args

    def __setstate__(self, state):
        self.__dict__["_pma_state"] = _interned(state)

    def __reduce_ex__(self, protocol):
        d = self.__dict__
        if "_pma_call" in d:
            return type(self), d["_pma_call"], d.get("_pma_state")
        return copyreg.__newobj__, (type(self), *d.get("_pma_new", ())), d.get("_pma_state")


def _interned(state):
    """A state dict's keys as the attribute names they were (interned: pickled by identity)."""
    if isinstance(state, dict):
        return {sys.intern(k) if type(k) is str else k: v for k, v in state.items()}
    if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
        return tuple(_interned(s) for s in state)  # (dict, slots)
    return state


_STANDINS: dict[tuple[str, str], type] = {}


def standin_class(module: str, name: str) -> type:
    cls = _STANDINS.get((module, name))
    if cls is None:
        cls = _STANDINS[(module, name)] = type(name, (StandIn,), {"_pickle_as": (module, name)})
    return cls


# ---------------------------------------------------------------------------------------------
# DCP's metadata classes (same fields, same order, same pickled state as torch's dataclasses)


class _Record:
    """A plain object pickled as ``copyreg.__newobj__(cls)`` + its ``__dict__`` (a dataclass)."""

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other):
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None


class Metadata(_Record):
    _pickle_as = (_MD, "Metadata")

    def __init__(self, state_dict_metadata, planner_data=None, storage_data=None, storage_meta=None,
                 version=None):
        self.state_dict_metadata, self.planner_data, self.storage_data = state_dict_metadata, planner_data, storage_data
        self.storage_meta, self.version = storage_meta, version


class MCoreMetadataStandIn(Metadata):
    """megatron-core < 0.15 pickled this subclass of DCP's Metadata (adds ``mcore_data``)."""

    _pickle_as = (_MCORE, "MCoreMetadata")


class TensorStorageMetadata(_Record):
    _pickle_as = (_MD, "TensorStorageMetadata")

    def __init__(self, properties, size, chunks):
        self.properties, self.size, self.chunks = properties, size, chunks


class BytesStorageMetadata(_Record):
    _pickle_as = (_MD, "BytesStorageMetadata")


class ChunkStorageMetadata(_Record):
    _pickle_as = (_MD, "ChunkStorageMetadata")

    def __init__(self, offsets, sizes):
        self.offsets, self.sizes = offsets, sizes


class StorageMeta(_Record):
    _pickle_as = (_MD, "StorageMeta")


class TensorProperties(_Record):
    """torch >= 2.1 pickles ``(dtype, layout, requires_grad, memory format enum, pin_memory)``;
    older torch pickled the dataclass ``__dict__``. Either is kept as read and written back."""

    _pickle_as = (_MD, "TensorProperties")

    def __getstate__(self):
        return self._state

    def __setstate__(self, state):
        self._state = _interned(state) if isinstance(state, dict) else tuple(state)

    @property
    def dtype(self) -> DType:
        return self._state["dtype"] if isinstance(self._state, dict) else self._state[0]

    def with_dtype(self, dtype: DType) -> "TensorProperties":
        """The same properties for a tensor stored as ``dtype`` (``--save-dtype``)."""
        new = object.__new__(type(self))
        new._state = {**self._state, "dtype": dtype} if isinstance(self._state, dict) else (dtype, *self._state[1:])
        return new


class MetadataIndex(_Record):
    """Hashed and compared on (fqn, offset), like torch's frozen dataclass (``index`` is a hint)."""

    _pickle_as = (_MD, "MetadataIndex")
    offset = None

    def __init__(self, fqn: str, offset: Sequence[int] | None = None, index: int | None = None):
        self.fqn, self.index = fqn, index  # torch's __init__ sets them in this order
        if offset is not None:
            self.offset = Size(offset)

    def __eq__(self, other):
        return isinstance(other, MetadataIndex) and (self.fqn, self.offset) == (other.fqn, other.offset)

    def __hash__(self):
        return hash((self.fqn, self.offset))


class StorageInfo(_Record):
    """``torch.distributed.checkpoint.filesystem._StorageInfo``: where a chunk's bytes are."""

    _pickle_as = (_FS, "_StorageInfo")

    def __init__(self, relative_path: str, offset: int, length: int,
                 transform_descriptors: Sequence[str] | None = None):
        self.relative_path, self.offset, self.length = relative_path, offset, length
        self.transform_descriptors = transform_descriptors

    def __getstate__(self):  # as torch's: None fields are left out
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def __setstate__(self, state):
        self.transform_descriptors = None
        self.__dict__.update(_interned(state))


_KNOWN = {c._pickle_as: c for c in (Metadata, MCoreMetadataStandIn, TensorStorageMetadata, BytesStorageMetadata,
                                    ChunkStorageMetadata, StorageMeta, TensorProperties, MetadataIndex,
                                    StorageInfo, Size)}


# ---------------------------------------------------------------------------------------------
# Pickling


class Unpickler(safe_pickle.Restricted, pickle.Unpickler):
    """Loads DCP metadata into the stand-ins above (globals outside the allowlist are refused, see
    :mod:`safe_pickle`); other allowed globals but plain Python ones become :class:`StandIn` classes."""

    def __init__(self, file, source="pickle"):
        super().__init__(file)
        self.source = source

    def resolve(self, module, name):
        known = _KNOWN.get((module, name))
        if known is not None:
            return known
        if module == "torch" and DType.get(name) is not None:
            return DType.get(name)
        if module in ("builtins", "collections", "_codecs") and (module, name) in safe_pickle.ALLOWED:
            return super().resolve(module, name)
        return standin_class(module, name)


def loads(data: bytes, source="pickle"):
    return Unpickler(io.BytesIO(data), source).load()


class _Pickler(pickle._Pickler):
    """Pure-Python pickler that writes stand-ins under their real global names."""

    def save_global(self, obj, name=None):
        real = getattr(obj, "_pickle_as", None) if isinstance(obj, (type, DType)) else None
        if real is None:
            return super().save_global(obj, name)
        module, qualname = real if obj is Size else map(sys.intern, real)  # one object per name, as torch's
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
        self.memoize(obj)


def dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.DEFAULT_PROTOCOL).dump(obj)
    return buf.getvalue()
