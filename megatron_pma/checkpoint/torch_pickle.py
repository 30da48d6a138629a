"""Load a ``torch.save`` file without importing the classes it pickles, and save it back exactly.

Legacy Megatron checkpoints pickle Megatron objects (enums inside ``args``, ...). The merge must
rewrite such a file without importing megatron, and Megatron must load the result as if it had
written it. Every global passes :mod:`safe_pickle`'s allowlist first; an allowed class outside a
few safe packages (Megatron's enums) then loads as a stand-in that remembers how it was
built (called, or ``__new__`` + state) and pickles back the same way under its original name, and
every global is written back under the name it was read with. String identity is kept too (no
interning of attribute names), so re-saving an unmodified file reproduces it byte for byte.
Tensors are memory-mapped (``mmap=True``): loading costs the pickle only; writes to them stay
private to this process (copy-on-write), the file is never modified.
"""

from __future__ import annotations

import os
import pickle
import types
from pathlib import Path

import torch

from megatron_pma.checkpoint import dcp_types, safe_pickle

# Allowed globals of these packages load as the real thing; others (Megatron's enums) as stand-ins.
_IMPORTED = {"torch", "collections", "argparse", "builtins", "numpy", "_codecs", "_io", "signal"}
_NOT_IMPORTED = {("torch.storage", "_load_from_bytes")}  # it would torch.load(weights_only=False)


class StandIn(dcp_types.StandIn):
    """An object of a class we did not import; pickles back to what was read (its state's strings
    kept as read: see ``_load_build``)."""

    def __setstate__(self, state):
        self.__dict__["_pma_state"] = state

    def __repr__(self):
        module, name = type(self)._pma_origin
        args = self.__dict__.get("_pma_call", self.__dict__.get("_pma_new", ()))
        return f"<{module}.{name}{args!r}>"


def _load_build(self):
    """pickle's BUILD without ``sys.intern`` on attribute names (keeps string identity)."""
    state = self.stack.pop()
    inst = self.stack[-1]
    setstate = getattr(inst, "__setstate__", None)
    if setstate is not None:
        setstate(state)
        return
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slots = state
    if state:
        inst.__dict__.update(state)
    for key, value in (slots or {}).items():
        setattr(inst, key, value)


class Codec:
    """One pickle_module for torch.load / torch.save: what was loaded through it saves back alike."""

    def __init__(self):
        self.source = "pickle"  # the file being loaded, for refusals
        self._origins: dict[int, tuple[str, str]] = {}  # id(global) -> name it was read with
        self._classes: dict[tuple[str, str], type] = {}
        self._keep: list = []  # globals we hold an id of stay alive
        unpickler = self._unpickler()
        self.module = types.SimpleNamespace(Unpickler=unpickler, Pickler=self._pickler(),
                                            load=lambda f, **kw: unpickler(f, **kw).load(),
                                            __name__="pma_torch_pickle")

    def _standin(self, module: str, name: str) -> type:
        cls = self._classes.get((module, name))
        if cls is None:
            cls = type(name, (StandIn,), {"__module__": f"pma_standin.{module}", "_pma_origin": (module, name)})
            self._classes[(module, name)] = cls
        return cls

    def _unpickler(self):
        codec = self

        class Unpickler(safe_pickle.Restricted, pickle._Unpickler):
            dispatch = dict(pickle._Unpickler.dispatch)
            dispatch[pickle.BUILD[0]] = _load_build
            source = property(lambda self: codec.source)

            def resolve(self, module, name):
                found = None
                if (module, name) in safe_pickle.ALLOWED and module.split(".")[0] in _IMPORTED \
                        and (module, name) not in _NOT_IMPORTED:
                    try:
                        found = super().resolve(module, name)
                    except (ImportError, AttributeError):
                        found = None
                if found is None:
                    found = codec._standin(module, name)
                if id(found) not in codec._origins:
                    codec._origins[id(found)] = (module, name)
                    codec._keep.append(found)
                return found

        return Unpickler

    def _pickler(self):
        origins = self._origins

        class Pickler(pickle._Pickler):
            def save_global(self, obj, name=None):
                origin = origins.get(id(obj))
                if origin is None:
                    return super().save_global(obj, name)
                self.write(pickle.GLOBAL + f"{origin[0]}\n{origin[1]}\n".encode("utf-8"))
                self.memoize(obj)

        return Pickler

    def load(self, path: Path, mmap: bool = True):
        self.source = path
        return torch.load(os.fspath(path), map_location="cpu", mmap=mmap, weights_only=False,
                          pickle_module=self.module)

    def save(self, obj, path: Path) -> None:
        # a path, not a file object: torch names the archive after the file, as Megatron's save did
        torch.save(obj, os.fspath(path), pickle_module=self.module)


def load(path: Path, mmap: bool = True):
    """``(object, codec)``: save the object back with ``codec.save``."""
    codec = Codec()
    return codec.load(path, mmap=mmap), codec
