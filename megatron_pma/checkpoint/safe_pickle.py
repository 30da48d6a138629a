"""The one gate every pickle the project reads goes through: an allowlist of globals.

A checkpoint's pickles (DCP ``.metadata``, ``common.pt``, byte objects, legacy ``.pt`` files,
Bridge's ``train_state.pt``) name the callables that rebuild their objects; an unrestricted
unpickler calls whatever they name (``builtins.eval``, ``os.system``, ...), so merging a
stranger's checkpoint could run their code. Every unpickler here is a :class:`Restricted` one: a
global outside :data:`ALLOWED` raises :class:`UnsafePickle` (one line naming the file and the
``module.name``) before it is ever imported. What an allowed global then loads *as* is each
reader's choice (``dcp_types``: torch-free stand-ins; ``torch_pickle``: torch's own classes or
stand-ins; :class:`InertUnpickler`: inert stand-ins): the allowlist says what is legal, not how
it is rebuilt.

:data:`ALLOWED` holds what real saves contain (listed by ``tests/pickle_globals.py`` over the
test fixtures: megatron-core 0.14 / 0.16.1 / 0.19.2 torch_dist, legacy ``--ckpt-format torch``,
NeMo 2, distributed optimizer, bf16), the enums Megatron-LM puts in ``args``
(``megatron/core/enums.py``, ``megatron/core/transformer/enums.py``), Bridge's
``train_state.pt`` (a dict of 0-d tensors, ``training/state.py``), and torch's tensor rebuild
functions and scalar types. None of them can run code of the pickle's choosing.

``--trust-pickles`` (only for checkpoints you produced) lifts the refusal for exotic classes: it
sets :data:`TRUST_ENV`, which forked workers and the watch / hook merge children inherit. Even
then this process never imports a global outside the allowlist: it loads as a stand-in.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

from megatron_pma.checkpoint import torch_names
from megatron_pma.errors import PMAError

TRUST_ENV = "MEGATRON_PMA_TRUST_PICKLES"
TRUST_HINT = "pass --trust-pickles (only for checkpoints you produced) to accept it"
REFUSAL = "refusing to unpickle"  # every refusal line holds it (the watcher tells refusals apart by it)

_DCP = "torch.distributed.checkpoint"
_MCORE_DCP = "megatron.core.dist_checkpointing.strategies.torch"
_MCORE_ENUMS = {
    "megatron.core.enums": ("ModelType", "Fp8Recipe", "Fp4Recipe"),
    "megatron.core.transformer.enums": ("ModelType", "LayerType", "AttnType", "AttnMaskType", "AttnBackend",
                                        "CudaGraphModule", "CudaGraphScope", "InferenceCudaGraphScope"),
    "megatron.model.enums": ("ModelType", "LayerType", "AttnType", "AttnMaskType"),  # Megatron-LM < core 0.5
}
_TE_RECIPE = ("Format", "_FormatHelper", "_OverrideLinearPrecision", "MMParams", "QParams", "DelayedScaling",
              "Float8CurrentScaling", "MXFP8BlockScaling", "Float8BlockScaling", "NVFP4BlockScaling")

ALLOWED: frozenset[tuple[str, str]] = frozenset({
    # DCP .metadata (torch >= 2.0; torch < 2.1 kept TensorProperties under _shard)
    *((f"{_DCP}.metadata", n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                        "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                        "StorageMeta", "_MEM_FORMAT_ENCODING")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    *((f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
    ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
    # megatron-core < 0.15 .metadata
    (_MCORE_DCP, "MCoreMetadata"), (_MCORE_DCP, "MCoreSavePlan"),
    # torch scalars and tensors (torch.save pickles storages by their legacy class name)
    *(("torch", n) for n in [*(d[0] for d in torch_names.DTYPES), *torch_names.STORAGE_DTYPES]),
    *(("torch", n) for n in ("Size", "Tensor", "device", "strided", "sparse_coo", "contiguous_format",
                             "channels_last", "channels_last_3d", "preserve_format")),
    ("torch.serialization", "_get_layout"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    # numpy arrays and scalars (rng state), numpy 1.x and 2.x module names
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    # plain Python
    ("collections", "OrderedDict"), ("argparse", "Namespace"), ("_codecs", "encode"), ("_io", "BytesIO"),
    # StorageMeta.checkpoint_id of a plain torch DCP save given a Path (pathlib._local: Python >= 3.13)
    *((m, n) for m in ("pathlib", "pathlib._local") for n in ("PosixPath", "PurePosixPath", "WindowsPath",
                                                              "PureWindowsPath")),
    *(("builtins", n) for n in ("set", "frozenset", "slice", "complex")),
    # enums Megatron-LM keeps in args (attention_backend, exit_signal, model_type, cuda graphs, fp8)
    ("signal", "Signals"),
    *((m, n) for m, names in _MCORE_ENUMS.items() for n in names),
    # Transformer Engine's fp8 _extra_state (a pickle inside a uint8 tensor): its recipe (plain
    # dataclasses and enums, transformer_engine/common/recipe) and CPU tensors pickled without
    # torch.save, whose storages are torch.save bytes (read here through this allowlist too)
    *(("transformer_engine.common.recipe", n) for n in _TE_RECIPE),
    ("torch.storage", "_load_from_bytes"),
})


def trusted() -> bool:
    """``--trust-pickles`` is on (in this process or the one that started it)."""
    return os.environ.get(TRUST_ENV, "") not in ("", "0")


def set_trusted(enabled: bool = True) -> None:
    """Process-wide switch; an environment variable, so forked workers and child merges see it."""
    os.environ[TRUST_ENV] = "1" if enabled else "0"


@contextlib.contextmanager
def trusting(enabled: bool = True):
    """``with trusting(): merge_checkpoints(...)``: the Python API's ``--trust-pickles``."""
    old = os.environ.get(TRUST_ENV)
    set_trusted(enabled)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(TRUST_ENV, None)
        else:
            os.environ[TRUST_ENV] = old


class UnsafePickle(PMAError):
    """A pickle names a global outside :data:`ALLOWED`."""

    def __init__(self, source, module: str, name: str):
        super().__init__(f"{source}: {REFUSAL} {module}.{name} (not on the allowlist of what checkpoints "
                         f"hold: loading it could run code); {TRUST_HINT}")
        self.source, self.global_name = str(source), f"{module}.{name}"


class Restricted:
    """Mixin for a ``pickle.Unpickler`` (C or pure Python): every global passes the allowlist,
    then :meth:`resolve` decides what it loads as (default: the real object). ``source`` names
    the file in the refusal."""

    source = "pickle"

    def find_class(self, module, name):
        real = canonical(module, name)
        if real not in ALLOWED and not trusted():
            raise UnsafePickle(self.source, *real)
        return self.resolve(module, name)  # as written: a reader that pickles back keeps the spelling

    def resolve(self, module, name):
        return super().find_class(module, name)


def canonical(module: str, name: str) -> tuple[str, str]:
    """What a global means: protocol 2 (torch.save's) writes Python 2 names (``__builtin__.set``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


# ---------------------------------------------------------------------------------------------
# Checking a pickle: load it whole, with every allowed global an inert stand-in


class Inert:
    """An object of a class we do not import: takes any arguments, state and items; runs nothing."""

    def __init__(self, *args, **kwargs):
        self._pma_args = args

    def __call__(self, *args, **kwargs):  # enums are rebuilt by calling their class
        return type(self)(*args)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update((k, v) for k, v in state.items() if isinstance(k, str))

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def add(self, item):
        pass

    def __setitem__(self, key, value):
        pass


_REAL = {("collections", "OrderedDict"), ("argparse", "Namespace"), ("_codecs", "encode"),
         *((m, n) for m, n in ALLOWED if m == "builtins")}


def _no_tensor(*args, **kwargs):
    """A tensor, as an :class:`Inert` object: whatever the pickle does with it next succeeds, as it
    would with the real tensor (a failed load would end the check early, see ``_unpickle``)."""
    return Inert()


class InertUnpickler(Restricted, pickle.Unpickler):
    """Loads any well-formed pickle without torch or megatron: tensors, and allowed classes other
    than plain Python ones, load as :class:`Inert` stand-ins (reading ``args`` and counters
    works). Completing a load proves every global of the stream passed the allowlist: a pickle is
    a straight-line program, each global it names is looked up on the way.

    It also notes the bytes a reader may unpickle in turn: the keys of uint8 storages
    (Transformer Engine's ``_extra_state`` is ``pickle.dumps(...)`` in a uint8 tensor, which its
    ``set_extra_state`` unpickles) and the contents of ``io.BytesIO`` objects (TE's older
    ``_extra_state``, a ``torch.save`` it ``torch.load``-s)."""

    def __init__(self, file, source="pickle"):
        super().__init__(file)
        self.source = source
        self.byte_storages: list[str] = []
        self.buffers: list[bytes] = []

    def resolve(self, module, name):
        real = canonical(module, name)
        if real in _REAL:
            return super().resolve(module, name)
        if real == ("_io", "BytesIO"):
            return self._bytes_io()
        if real == ("torch.storage", "_load_from_bytes"):  # torch.load(weights_only=False) of the bytes
            return lambda data: load_inert(data, f"{self.source} (torch.storage._load_from_bytes)") and None
        if module.startswith("torch") and name.startswith("_rebuild"):
            return _no_tensor
        return type(name, (Inert,), {"__module__": f"pma_standin.{module}"})

    def _bytes_io(self):
        buffers = self.buffers

        class BytesIO(Inert):
            def __init__(self, initial=b"", *args, **kwargs):  # BytesIO(data)
                if isinstance(initial, (bytes, bytearray)):
                    buffers.append(bytes(initial))

            def __setstate__(self, state):  # copyreg.__newobj__ + (value, position, dict)
                if isinstance(state, tuple) and state and isinstance(state[0], (bytes, bytearray)):
                    buffers.append(bytes(state[0]))

        return BytesIO

    def persistent_load(self, pid):
        # torch.save: ("storage", <torch.XStorage>, key, location, numel[, view]); no bytes needed
        if isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" \
                and getattr(pid[1], "__name__", None) == "ByteStorage":
            self.byte_storages.append(str(pid[2]))
        return Inert()  # the storage: its bytes are never needed for the plain fields we read


_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save's pre-1.6 format opens with this pickle
_ZIP_MAGIC = b"PK\x03\x04"


def load_inert(data: bytes | Path, source=None) -> object:
    """The object in a pickle or a ``torch.save`` file (zip: every ``*.pkl`` member is loaded,
    ``data.pkl`` returned; pre-1.6 format: its magic, protocol, sys info, object and storage-key
    pickles). A path is read as a file: only its pickles, never its tensor bytes, are loaded.
    Raises :class:`UnsafePickle` on a global outside the allowlist; a damaged pickle raises
    whatever unpickling it raised."""
    with (io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")) as buf:
        return _load_inert(buf, source or data)


def check(data: bytes | Path, source=None) -> None:
    """:func:`load_inert` for a pickle we only copy: one we cannot load to the end is refused
    too (torch.load might read further than we could)."""
    source = source or data
    try:
        load_inert(data, source)
    except PMAError:
        raise
    except PermissionError:
        raise PMAError(f"{source}: permission denied") from None
    except Exception as e:
        raise PMAError(f"{source}: unreadable pickle, cannot check that it is safe to copy "
                       f"({type(e).__name__}: {str(e)[:200]})") from None


def _load_inert(buf, source):
    if buf.read(4) == _ZIP_MAGIC:  # torch.load's own test: a zip archive, else the legacy format
        with zipfile.ZipFile(buf) as zf:
            found = None
            for info in zf.infolist():  # each entry, duplicated names too
                if info.filename.endswith(".pkl"):
                    data_pkl = info.filename.endswith("data.pkl")
                    prefix = info.filename[: -len("data.pkl")]  # its storages: <prefix>data/<key>
                    obj = _unpickle(io.BytesIO(zf.read(info)), f"{source}:{info.filename}",
                                    lambda key, p=prefix: _pickled_member(zf, f"{p}data/{key}") if data_pkl else None)
                    if data_pkl and found is None:
                        found = (obj,)
            if found is None:
                raise ValueError("no data.pkl")
            return found[0]
    buf.seek(0)
    if tarfile.is_tarfile(buf):
        raise ValueError("torch < 0.4 tar format")
    buf.seek(0)
    first = _unpickle(buf, source)
    if type(first) is not int or first != _TORCH_LEGACY_MAGIC:
        return first
    for _ in range(2):  # protocol version, sys info
        _unpickle(buf, source)
    obj = _unpickle(buf, source, lambda key: _legacy_format_storage(source))
    _unpickle(buf, source)  # storage keys
    return obj


def _legacy_format_storage(source):
    """The bytes of a uint8 storage of the pre-1.6 format (after the pickles): not read here."""
    if trusted():
        return None
    raise PMAError(f"{source}: pre-1.6 torch.save format with uint8 tensors, whose bytes (where Transformer "
                   f"Engine keeps a pickle) are not checked; re-save it with torch >= 1.6, or {TRUST_HINT}")


def _unpickle(f, source, storage=lambda key: None):
    """Load one pickle; then check the pickles hidden in its uint8 storages (``storage(key)``:
    their bytes, None when they do not look like a pickle) and ``BytesIO`` objects."""
    u = InertUnpickler(f, source)
    obj = u.load()
    hidden = [(f"{source} (uint8 tensor {key})", storage(key)) for key in u.byte_storages]
    hidden += [(f"{source} (BytesIO)", b) for b in u.buffers if looks_pickled(b)]
    for label, data in hidden:
        if data is not None:
            try:
                load_inert(data, label)
            except UnsafePickle:
                raise
            except Exception:  # not a pickle after all (an rng state, ...): nothing to run
                pass
    return obj


def looks_pickled(head: bytes) -> bool:
    """Starts as a protocol 2+ pickle or a ``torch.save`` zip does."""
    return head[:4] == _ZIP_MAGIC or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _pickled_member(zf: zipfile.ZipFile, name: str) -> bytes | None:
    try:
        with zf.open(name) as f:
            if not looks_pickled(f.read(4)):
                return None
        return zf.read(name)
    except KeyError:
        return None


# ---------------------------------------------------------------------------------------------
# Which files of a checkpoint are pickles (torch.load / pickle.load would run them)

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def is_pickled(path: Path) -> bool:
    """By name (``*.pt``, ...) or by content (a zip with a ``.pkl`` member, a protocol 2+ pickle)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head == _ZIP_MAGIC:
                with zipfile.ZipFile(f) as zf:
                    return any(n.endswith(".pkl") for n in zf.namelist())
            return looks_pickled(head)
    except (OSError, zipfile.BadZipFile):
        return False


def check_tree(root: Path, skip=lambda path: False) -> None:
    """Load every pickled file under ``root`` through the allowlist (not following symlinked
    folders; a symlinked file is checked through its target, as a reader would load it)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file() and not skip(path) and is_pickled(path):
                check(path)
