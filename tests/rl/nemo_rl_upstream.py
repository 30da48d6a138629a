"""Import the REAL NeMo-RL source of one release from ``../shared/upstream/nemo-rl/<tag>`` (unmodified
v0.5.0 / v0.6.0 / v0.7.0, see ../shared/upstream/README.md) for tests to use as the oracle.

NeMo-RL does not install here (its PyPI name is a placeholder; it pins CUDA builds), so the tag's folder
goes first on ``sys.path`` and only third-party modules that cannot be found get stand-ins (an empty
package whose attributes are inert classes); ``nemo_rl`` itself is never stood in for.  Two interpreter
shims, both for running NeMo-RL's source on this CPU-only Python 3.11 venv:

* ``torch.Tensor.cuda`` returns the tensor itself (NeMo-RL moves ``input_ids`` with ``.cuda()``);
* on Python < 3.12, ``typing.TypedDict`` is ``typing_extensions.TypedDict`` while NeMo-RL is imported
  (the 3.12 behaviour pydantic needs for v0.7's ``MasterConfig``; NeMo-RL requires Python >= 3.12).

Tests skip with the reason when ``../shared/upstream`` is absent.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import typing
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ROOT.parent / "shared" / "upstream" / "nemo-rl"
TAGS = ("v0.5.0", "v0.6.0", "v0.7.0")
SKIP_REASON = f"{UPSTREAM} (the unmodified NeMo-RL sources) is absent on this machine"


class _InertMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(name)

    def __getitem__(cls, item):
        return cls

    def __or__(cls, other):
        return cls

    __ror__ = __or__

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # used as a bare decorator: keep what it decorates
        return super().__call__()


class _Inert(metaclass=_InertMeta):
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(name)()

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        return self


def _inert(name):
    return _InertMeta(name, (_Inert,), {"__module__": "standin"})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _inert(name)
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves stand-in packages for the top-level names in ``tops`` (and their submodules)."""

    def __init__(self):
        self.tops: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.tops:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        module.__version__ = "999.0"  # version checks (e.g. torch.utils.tensorboard) pass
        return module

    def exec_module(self, module):
        pass


def _purge(names):
    for key in [k for k in sys.modules if k.split(".")[0] in names]:
        del sys.modules[key]


class NemoRL:
    """One release of NeMo-RL, imported for the duration of a ``use(tag)`` block."""

    def __init__(self, tag: str, finder: _StandInFinder):
        self.tag = tag
        self.root = UPSTREAM / tag
        self.version = tuple(int(x) for x in tag[1:].split("."))
        self._finder = finder

    def module(self, name: str):
        """Import ``name`` from this release, standing in for third-party modules that cannot be found."""
        for _ in range(64):
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError as err:
                top = (err.name or "").split(".")[0]
                if not top or top == "nemo_rl" or top in self._finder.tops or importlib.util.find_spec(top):
                    raise
                self._finder.tops.add(top)
                _purge({"nemo_rl"})  # re-import NeMo-RL cleanly past the missing module
        raise RuntimeError(f"too many missing modules importing {name}")

    @property
    def loss_module(self):
        return self.module("nemo_rl.algorithms.loss" if self.version >= (0, 6) else "nemo_rl.algorithms.loss_functions")

    @property
    def logprob_input(self) -> bool:
        """v0.6+: the loss receives prepared next-token log-probs; v0.5: logits."""
        return self.version >= (0, 6)

    @property
    def standins(self) -> set[str]:
        return set(self._finder.tops)


@contextmanager
def use(tag: str):
    """Make ``tag``'s ``nemo_rl`` the importable one (and undo it afterwards)."""
    if not (UPSTREAM / tag / "nemo_rl").is_dir():
        pytest.skip(SKIP_REASON)
    finder = _StandInFinder()
    path = str(UPSTREAM / tag)
    saved_cuda, saved_typed_dict = torch.Tensor.cuda, typing.TypedDict
    _purge({"nemo_rl"})
    sys.path.insert(0, path)
    sys.meta_path.insert(0, finder)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    if sys.version_info < (3, 12):
        import typing_extensions

        typing.TypedDict = typing_extensions.TypedDict
    try:
        yield NemoRL(tag, finder)
    finally:
        torch.Tensor.cuda, typing.TypedDict = saved_cuda, saved_typed_dict
        sys.meta_path.remove(finder)
        sys.path.remove(path)
        _purge({"nemo_rl"} | finder.tops)
