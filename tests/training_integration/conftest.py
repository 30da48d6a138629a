"""Fixtures for the Megatron-LM integration tests (launcher, patch, sidecar watcher).

``mcore_0192_site``: the megatron-core 0.19.2 wheel installed with ``pip install --no-deps
--ignore-requires-python --target`` into the test cache (once; reused by later sessions). Its
``megatron/training`` is the real Megatron-LM training code these tests run against. Skips
with the reason when PyPI cannot be reached.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # ckpt_factory

MCORE_VERSION = "0.19.2"
DRIVER = HERE / "real_megatron_driver.py"


def cache_dir() -> Path:
    root = os.environ.get("PMA_TEST_CACHE") or os.path.join(
        tempfile.gettempdir(), f"pma-test-cache-{os.getuid()}")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p




@pytest.fixture(scope="session")
def mcore_0192_site() -> Path:
    root = cache_dir()
    final = root / f"megatron-core-{MCORE_VERSION}-site"
    marker = final / ".complete"
    with open(root / f"megatron-core-{MCORE_VERSION}-site.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            if final.exists():
                shutil.rmtree(final)
            tmp = Path(tempfile.mkdtemp(prefix=".mcore-site-", dir=root))
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-requires-python",
                   "--no-compile", "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
                   "--target", str(tmp), f"megatron-core=={MCORE_VERSION}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0 or not (tmp / "megatron" / "training" / "checkpointing.py").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                pytest.skip(f"cannot install megatron-core=={MCORE_VERSION} from PyPI "
                            f"(pip install --target failed: {last})")
            (tmp / ".complete").write_text("ok\n")
            os.replace(tmp, final)
    return final


def subprocess_env(*front_paths) -> dict:
    """Environment for a child that must see ``front_paths`` first, then the repo."""
    env = dict(os.environ)
    paths = [str(p) for p in front_paths] + [str(REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    env["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env
