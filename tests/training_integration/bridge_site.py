"""The megatron-bridge wheel's real modules for tests, on Python 3.11.

``megatron-bridge`` declares Python >= 3.12 and its package ``__init__`` imports the whole model zoo
(transformers, Transformer Engine, ...), so it cannot be imported here. It is installed with ``pip
install --no-deps --ignore-requires-python --target`` into the test cache (once; later sessions reuse
it) and single modules whose imports are all available are loaded from their file by path.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

BRIDGE_VERSION = "0.6.2"


class BridgeUnavailable(RuntimeError):
    """pip could not fetch the wheel (offline): callers skip."""


def install_bridge(cache: Path) -> Path:
    """The site dir holding ``megatron/bridge`` of megatron-bridge ``BRIDGE_VERSION``."""
    final = cache / f"megatron-bridge-{BRIDGE_VERSION}-site"
    with open(cache / f"megatron-bridge-{BRIDGE_VERSION}-site.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / ".complete").exists():
            shutil.rmtree(final, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=".bridge-site-", dir=cache))
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-requires-python",
                   "--no-compile", "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
                   "--target", str(tmp), f"megatron-bridge=={BRIDGE_VERSION}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0 or not (tmp / "megatron" / "bridge" / "training").is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                raise BridgeUnavailable(f"cannot install megatron-bridge=={BRIDGE_VERSION}: {last}")
            (tmp / ".complete").write_text("ok\n")
            os.replace(tmp, final)
    return final


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
