"""PyTorch DCP's metadata classes, imported without ``torch.distributed.checkpoint``'s package
``__init__`` (planners, DTensor, HF storage: about half a second of a merge's start-up), plus a
stand-in for ``filesystem._StorageInfo`` that pickles under the real class's name.

Readers of our ``.metadata`` (Megatron, plain DCP) get the genuine torch classes back.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import pickle
import sys
import types
from dataclasses import dataclass
from typing import Sequence

_PACKAGE = "torch.distributed.checkpoint"


def _light_import(module: str):
    if module in sys.modules or _PACKAGE in sys.modules:
        return importlib.import_module(module)
    spec = importlib.util.find_spec(_PACKAGE)
    stub = types.ModuleType(_PACKAGE)
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules[_PACKAGE] = stub
    try:
        return importlib.import_module(module)
    finally:
        # A later `import torch.distributed.checkpoint` runs the real __init__, which picks up
        # this already-imported submodule: the classes stay the same objects.
        if sys.modules.get(_PACKAGE) is stub:
            del sys.modules[_PACKAGE]


_md = _light_import(f"{_PACKAGE}.metadata")
Metadata = _md.Metadata
MetadataIndex = _md.MetadataIndex
TensorStorageMetadata = _md.TensorStorageMetadata
BytesStorageMetadata = _md.BytesStorageMetadata


@dataclass
class StorageInfo:
    """Same fields and pickled form as ``torch.distributed.checkpoint.filesystem._StorageInfo``."""

    relative_path: str
    offset: int
    length: int
    transform_descriptors: Sequence[str] | None = None

    _pickle_as = (f"{_PACKAGE}.filesystem", "_StorageInfo")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if v is not None}


class _Pickler(pickle._Pickler):
    """Pure-Python pickler that writes stand-in classes under their real global names."""

    def save_global(self, obj, name=None):
        real = getattr(obj, "_pickle_as", None) if isinstance(obj, type) else None
        if real is None:
            return super().save_global(obj, name)
        module, qualname = real
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
