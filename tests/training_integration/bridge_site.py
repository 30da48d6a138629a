"""The megatron-bridge wheel's real modules for tests, on Python 3.11.

``megatron-bridge`` declares Python >= 3.12 and its package ``__init__`` imports the whole model zoo
(transformers, Transformer Engine, ...), so it cannot be imported here. The wheel is fetched and
unpacked once by ``tests/bridge_factory.py`` (the one place that gets it), and single modules whose
imports are all available are loaded from their file by path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import bridge_factory

BRIDGE_VERSION = bridge_factory.VERSION
BridgeUnavailable = bridge_factory.WheelUnavailable  # pip could not fetch the wheel (offline): callers skip


def install_bridge() -> Path:
    """The folder holding ``megatron/bridge`` of megatron-bridge ``BRIDGE_VERSION``."""
    return bridge_factory.source()


def load_module(site: Path, dotted: str) -> ModuleType:
    """``site``'s ``dotted`` module loaded from its file, registered as ``bridge_<version>.<dotted>``
    (never as ``megatron.bridge...``: nothing else in the session sees it)."""
    name = f"bridge_{BRIDGE_VERSION.replace('.', '_')}.{dotted}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, site / (dotted.replace(".", "/") + ".py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod
