"""NeMo 2-layout checkpoints for tests, built by ``tests/fixtures/save_nemo2_checkpoints.py``.

    cached_nemo_run(name, **kwargs) -> Path      # NeMo's checkpoints/ dir, built once per cache
    load_with_megatron(ckpt, tp=1, ...) -> (loss, {sharded key: full tensor})

Cached beside ckpt_factory's runs (``$PMA_TEST_CACHE`` or the session dir), keyed by the
arguments, the saver's sources and the megatron-core / torch versions. Cached files are
read-only: copy the dir (``shutil.copytree``) before changing anything.
"""

from __future__ import annotations

import hashlib
import tempfile
from importlib import metadata
from pathlib import Path

import torch

import ckpt_factory

SCRIPT = ckpt_factory.FIXTURES / "save_nemo2_checkpoints.py"
_SOURCES = (SCRIPT, ckpt_factory.FIXTURES / "gpt_common.py", ckpt_factory.SAVER)


def _tag(name: str, kwargs: dict) -> str:
    h = hashlib.sha256(repr(sorted(kwargs.items())).encode())
    h.update(f"{metadata.version('megatron-core')} {torch.__version__}".encode())
    for f in _SOURCES:
        h.update(f.read_bytes())
    return f"{name}-{h.hexdigest()[:12]}"


def _save_args(ckpt_dir: Path, tp, steps, last, unfinished, optimizer, num_layers) -> list[str]:
    args = ["save", "--ckpt-dir", str(ckpt_dir), "--tp", str(tp), "--num-layers", str(num_layers),
            "--steps", ",".join(map(str, steps)), "--optimizer", optimizer]
    if last:
        args.append("--last")
    if unfinished is not None:
        args += ["--unfinished", str(unfinished)]
    return args


def cached_nemo_run(name: str, *, tp: int = 2, steps=(10, 20, 30), last: bool = True,
                    unfinished: int | None = 40, optimizer: str = "model",
                    num_layers: int = 2) -> Path:
    """A NeMo ``checkpoints/`` dir: finished saves at ``steps``, a ``-last`` copy of the newest
    (``last``) and a save whose ``-unfinished`` marker stayed (``unfinished``)."""
    kwargs = dict(tp=tp, steps=tuple(steps), last=last, unfinished=unfinished,
                  optimizer=optimizer, num_layers=num_layers)
    build = lambda tmp: ckpt_factory._torchrun(SCRIPT, tp, _save_args(tmp / "checkpoints", **kwargs))  # noqa: E731
    final = ckpt_factory.build_cached(_tag(name, kwargs), build, name)
    return final / "checkpoints"


def load_with_megatron(ckpt: Path, *, tp: int = 1, num_layers: int = 2):
    """Load a NeMo 2 checkpoint into a real GPTModel (megatron-core, ``module.`` prefix)."""
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "sd.pt"
        ckpt_factory._torchrun(SCRIPT, tp, ["load", "--ckpt", str(ckpt), "--tp", str(tp),
                                            "--num-layers", str(num_layers), "--out", str(out)])
        res = torch.load(out, weights_only=True)
    return float(res["loss"]), res["tensors"]
