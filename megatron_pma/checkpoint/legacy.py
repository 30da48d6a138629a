"""Megatron-LM's legacy ``--ckpt-format torch`` layout, read without megatron::

    iter_XXXXXXX/mp_rank_<tp:02d>[_<pp:03d>][_<ep:03d>]/model_optim_rng.pt   one torch.save per
                                                                            model-parallel rank
                                                       /distrib_optim.pt     distributed optimizer:
                                                                            fp32 main params + moments

(the ``_<pp>`` part only with pipeline parallelism, ``_<ep>`` only with expert parallelism).
Megatron writes each file in place, not under a temporary name, and the tracker after every rank
finished; a file still being written has no zip end record yet.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

MODEL_FILE = "model_optim_rng.pt"
DIST_OPTIM_FILE = "distrib_optim.pt"
RANK_DIR = re.compile(r"^mp_rank_\d{2}(_\d{3}){0,2}$")
_ZIP_END = b"PK\x05\x06"  # end-of-central-directory record: the last thing torch.save writes
_ZIP_END_SIZE = 22


def rank_dirs(ckpt_dir: Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    try:
        return sorted(p for p in ckpt_dir.iterdir() if RANK_DIR.match(p.name) and p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def is_legacy_checkpoint(ckpt_dir: Path) -> bool:
    """A checkpoint dir with ``mp_rank_*`` subdirs (Megatron's own test for the torch format)."""
    return bool(rank_dirs(ckpt_dir))


def any_legacy(inputs: Sequence[str | Path]) -> bool:
    return any(is_legacy_checkpoint(Path(p)) for p in inputs)


def finished(file: Path) -> bool:
    """The file ends with a zip end record: its torch.save returned (or it was cut there)."""
    try:
        with open(file, "rb") as f:
            f.seek(0, 2)
            if f.tell() < _ZIP_END_SIZE:
                return False
            f.seek(-_ZIP_END_SIZE, 2)
            return f.read(4) == _ZIP_END
    except (FileNotFoundError, IsADirectoryError):
        return False


def is_saved(ckpt_dir: Path) -> bool:
    """Every rank dir holds a finished model file (ranks whose dir is not there yet cannot be
    seen: in a save dir, the tracker tells when all ranks are done)."""
    dirs = rank_dirs(ckpt_dir)
    return bool(dirs) and all(finished(d / MODEL_FILE) for d in dirs)


def read_state(ckpt_dir: Path) -> dict | None:
    """The first rank's saved state (``args``, ``iteration``, ...; tensors memory-mapped)."""
    dirs = rank_dirs(ckpt_dir)
    if not dirs:
        return None
    from megatron_pma.checkpoint import torch_pickle  # imports torch: only legacy inputs pay it

    state, _ = torch_pickle.load(dirs[0] / MODEL_FILE)
    return state if isinstance(state, dict) else None


def expected_rank_dirs(args) -> list[str] | None:
    """The ``mp_rank_*`` names a dense run with these ``args`` writes (None when args do not say,
    or with expert parallelism, where which ranks write depends on the expert layout)."""
    sizes = [getattr(args, f"{k}_model_parallel_size", None) for k in ("tensor", "pipeline", "expert")]
    if not all(isinstance(s, int) and s > 0 for s in sizes) or sizes[2] != 1:
        return None
    tp, pp, _ = sizes
    return sorted(f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") for t in range(tp) for p in range(pp))
