"""NeMo-RL DTensor-backend step folders written by the real NeMo Automodel checkpointer, on CPU.

nemo-automodel installs no further here (its pins: CUDA kernels, transformers 5.5-5.18), but its
checkpoint code runs on this CPU torch with gloo: the wheel is fetched with ``pip download
--no-deps`` into ``$PMA_WHEELS`` (as bridge_factory does for Megatron-Bridge), unpacked into the
test cache, and put on ``PYTHONPATH`` of the rank processes of tests/fixtures/save_automodel_steps.py
(see there for the exact calls). Two writers:

- ``nemo-rl``: NeMo-RL v0.7.0's own ``AutomodelCheckpointManager`` (../shared/upstream) over
  nemo-automodel 0.4.0, the Automodel NeMo-RL v0.7.0 works with: its ``automodel`` extra pins
  ``transformers>=5.5.0,<5.6.0`` (pyproject.toml l. 117-126) as 0.4.0 pins 5.5.0, and its
  ``_rebuild_checkpointer_addons`` (checkpoint.py l. 241) calls ``Checkpointer._should_write_hf_metadata()``,
  a method in 0.4.0 and a module function from 0.5.0 on (0.7.0 raises AttributeError there).
- ``automodel``: nemo-automodel 0.7.0's ``Checkpointer`` directly, with the arguments NeMo-RL passes.

NeMo-RL's worker asks for ``is_async=True``; on CPU the saves are synchronous, through the same
storage writer (same files): 0.4.0 turns async off itself ("Async mode is only supported for torch
>= 2.9.0": it compares version strings, "2.13.0" < "2.9.0"), and 0.7.0's async ``Checkpointer``
cannot be built without an accelerator (torch's ``DefaultStager()``: "Non-blocking copy requires
that the current accelerator is available"), so the ``automodel`` writer passes ``is_async=False``.
The saves are cached per (writer, ranks, consolidated) under ``$PMA_TEST_CACHE`` (~10 s each).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

import ckpt_factory

VERSIONS = {"nemo-rl": "0.4.0", "automodel": "0.7.0"}   # writer -> nemo-automodel version
STEPS = (10, 20, 30)
VOCAB = 96
WORKER = ckpt_factory.FIXTURES / "save_automodel_steps.py"
UPSTREAM = ckpt_factory.REPO.parent / "shared" / "upstream" / "nemo-rl" / "v0.7.0"


class Unavailable(RuntimeError):
    """The wheel (or, for the ``nemo-rl`` writer, the NeMo-RL source) is not on this machine."""


def tiny_llama(seed: int):
    """A 2-layer bf16 Llama with seed-dependent weights (the DTensor-backend tests' policy)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(torch.bfloat16)


def wheel(version: str) -> Path:
    """The nemo-automodel wheel in ``$PMA_WHEELS`` (default: the test cache's ``wheels/``), fetched
    with pip when missing (raises Unavailable with pip's reason when pip cannot)."""
    folder = Path(os.environ.get("PMA_WHEELS") or ckpt_factory.cache_root() / "wheels")
    path = folder / f"nemo_automodel-{version}-py3-none-any.whl"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            f"nemo-automodel=={version}", "-d", str(folder)], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0 or not path.is_file():
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unavailable(f"pip could not fetch nemo-automodel=={version}: {tail}")
    return path


def source(version: str) -> Path:
    """The wheel's files, unpacked once into the test cache."""
    def build(tmp: Path) -> None:
        with zipfile.ZipFile(wheel(version)) as z:
            z.extractall(tmp)

    return ckpt_factory.build_cached(f"nemo-automodel-{version}-src", build)


def _env(writer: str) -> dict:
    if writer == "nemo-rl" and not (UPSTREAM / "nemo_rl").is_dir():
        raise Unavailable(f"{UPSTREAM} (the unmodified NeMo-RL source) is absent on this machine")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR")
    env["PYTHONPATH"] = os.pathsep.join([str(source(VERSIONS[writer])), str(ckpt_factory.REPO),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _run(writer: str, ranks: int, args: list[str]) -> None:
    ckpt_factory._run_ranks([sys.executable, str(WORKER), *args], ranks, _env(writer), timeout=600)


def saved_steps(writer: str, ranks: int, consolidated: bool) -> list[Path]:
    """Step folders 10/20/30 (``step_N/policy/weights/model/`` + ``policy/optimizer/optim/``), as
    ``writer`` saves them from ``ranks`` gloo processes; cached, read-only (copy before use)."""
    import transformers

    env = _env(writer)  # fails early (Unavailable) without the wheel or the NeMo-RL source
    key = hashlib.sha256(WORKER.read_bytes() + Path(__file__).read_bytes()).hexdigest()[:10]
    tag = (f"automodel-{writer}-{VERSIONS[writer]}-r{ranks}-c{int(consolidated)}-torch{torch.__version__}"
           f"-tf{transformers.__version__}-{key}")

    def build(tmp: Path) -> None:
        ckpt_factory._run_ranks([sys.executable, str(WORKER), "save", str(tmp), writer, str(int(consolidated)),
                                 *map(str, STEPS)], ranks, env, timeout=600)

    final = ckpt_factory.build_cached(tag, build, f"automodel {writer} x{ranks}")
    return [final / f"step_{s}" for s in STEPS]


def load_back(writer: str, step_dir: Path, out_pt: Path) -> dict:
    """``step_dir`` loaded by ``writer``'s own load path into a fresh tiny Llama + AdamW (1 rank):
    ``{"model": state_dict, "optim": flattened optimizer state}``."""
    _run(writer, 1, ["load", writer, str(step_dir), str(out_pt)])
    return torch.load(out_pt, weights_only=True)


def copy_steps(steps: list[Path], dest: Path) -> list[Path]:
    """A writable copy of cached step folders under ``dest``."""
    out = []
    for s in steps:
        shutil.copytree(s, dest / s.name)
        for p in [dest / s.name, *(dest / s.name).rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
        out.append(dest / s.name)
    return out
