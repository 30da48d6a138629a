"""Legacy ``--ckpt-format torch`` checkpoints for tests, written by real Megatron-LM code
(``tests/fixtures/save_legacy_checkpoints.py`` under the megatron-core 0.19.2 wheel)::

    cached_legacy_run(name, megatron_path, *, optimizer="adam", dtype="bf16") -> [iter dirs]
    load_with_megatron(specs, megatron_path, *, optimizer, dtype) -> [[result per spec], per TP rank]

Cached beside ckpt_factory's runs (``$PMA_TEST_CACHE`` or the session dir), keyed by the
arguments, the saver's sources and the torch version. Cached files are read-only: copy the run
(``ckpt_factory.copy_run``) before changing anything.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import torch

import ckpt_factory

SCRIPT = ckpt_factory.FIXTURES / "save_legacy_checkpoints.py"
_SOURCES = (SCRIPT, ckpt_factory.FIXTURES / "gpt_common.py",
            ckpt_factory.REPO / "tests" / "training_integration" / "real_megatron_driver.py")
TP = 2
ITERATIONS = (10, 20, 30)


def _tag(name: str, kwargs: dict, megatron_path) -> str:
    h = hashlib.sha256(repr(sorted(kwargs.items())).encode())
    h.update(f"{Path(megatron_path).name} {torch.__version__} {sys.version_info[:2]}".encode())
    for f in _SOURCES:
        h.update(f.read_bytes())
    return f"{name}-{h.hexdigest()[:12]}"


def _run(args: list[str], megatron_path) -> str:
    env = ckpt_factory._env(megatron_path)
    return ckpt_factory._run_ranks([sys.executable, str(SCRIPT), *args], TP, env, timeout=600)


def cached_legacy_run(name: str, megatron_path, *, optimizer: str = "adam", dtype: str = "bf16") -> list[Path]:
    """A TP=2 save dir with iterations 10, 20, 30 (3 optimizer steps apart); its iter dirs."""
    kwargs = dict(optimizer=optimizer, dtype=dtype)

    def build(tmp: Path) -> None:
        _run(["save", "--save-dir", str(tmp / "save"), "--tp", str(TP), "--optimizer", optimizer,
              "--dtype", dtype, "--iterations", ",".join(map(str, ITERATIONS))], megatron_path)

    final = ckpt_factory.build_cached(_tag(name, kwargs, megatron_path), build, name)
    return [final / "save" / f"iter_{i:07d}" for i in ITERATIONS]


def load_with_megatron(specs: list[str], megatron_path, *, optimizer: str, dtype: str) -> list[list[dict]]:
    """Megatron-LM's own load_checkpoint on each save dir (``DIR`` or ``DIR:no-optim``), in one
    launch; per TP rank a list of {"load", "iteration", "loss", "model", "main_params"}."""
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "loaded"
        _run(["load", "--load", *map(str, specs), "--tp", str(TP), "--optimizer", optimizer,
              "--dtype", dtype, "--out", str(out)], megatron_path)
        return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(TP)]
