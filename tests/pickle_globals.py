"""Every pickle of the fixture checkpoints, and the globals they name (how safe_pickle.ALLOWED was built).

    python tests/pickle_globals.py [CACHE_DIR ...]     # default $PMA_TEST_CACHE

lists each ``module.name`` the pickles under the given folders use, with how many pickles use it
and one of them. Pickles: DCP ``.metadata``, every DCP entry's blob (byte objects and tensor
blobs), and every other pickled file (``common.pt``, legacy ``model_optim_rng.pt`` /
``distrib_optim.pt``, Bridge ``train_state.pt``, ...), each zip member ``*.pkl`` on its own.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_pma.checkpoint import dcp, dcp_types, safe_pickle  # noqa: E402


def pickles(root: Path):
    """(label, raw pickle bytes) of every pickle under ``root``."""
    root = Path(root)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name == dcp.METADATA_FILE:
            data = path.read_bytes()
            yield str(path), data
            md = dcp_types.loads(data)
            for idx, info in md.storage_data.items():
                blob = dcp.read_bytes(str(path.parent / info.relative_path), info.offset, info.length)
                yield from _members(blob, f"{path.parent / info.relative_path} ({idx.fqn})")
        elif path.suffix != ".distcp" and not path.name.endswith(".lock") and safe_pickle.is_pickled(path):
            yield from _members(path.read_bytes(), str(path))


def _members(data: bytes, label: str):
    buf = io.BytesIO(data)
    if zipfile.is_zipfile(buf):
        with zipfile.ZipFile(buf) as zf:
            for name in zf.namelist():
                if name.endswith(".pkl"):
                    yield f"{label}:{name}", zf.read(name)
    else:
        yield label, data


class _Anything:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __setstate__(self, state):
        pass

    append = extend = add = __setitem__ = lambda self, *a: None


class _Recorder(pickle.Unpickler):
    """Loads a pickle with every global an inert stand-in, noting each global's name."""

    def __init__(self, data: bytes, seen: set):
        super().__init__(io.BytesIO(data))
        self.seen = seen

    def find_class(self, module, name):
        self.seen.add((module, name))
        return type(name, (_Anything,), {})

    def persistent_load(self, pid):
        return None


def globals_of(data: bytes) -> set[tuple[str, str]]:
    seen: set = set()
    _Recorder(data, seen).load()
    return seen


def main(roots) -> None:
    used = collections.defaultdict(list)
    for root in roots:
        for label, data in pickles(root):
            for g in globals_of(data):
                used[g].append(label)
    for (module, name), labels in sorted(used.items()):
        flag = "" if (module, name) in safe_pickle.ALLOWED else "   NOT ALLOWED"
        print(f"{module}.{name}{flag}  [{len(labels)} pickles, e.g. {labels[0]}]")


if __name__ == "__main__":
    main(sys.argv[1:] or [os.environ["PMA_TEST_CACHE"]])
